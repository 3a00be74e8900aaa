"""The planner's inputs and answers: a traffic profile with its targets (`Traffic`), one layout's
figures (`Layout`), and why a layout cannot serve (`Infeasible`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.planner.cost import Precision, Techniques


@dataclass(frozen=True)
class Traffic:
    """A traffic profile and its targets. Defaults: DeepSeek's published 24-hour service (608B input
    and 168B output tokens a day, 4,989 tokens of KV per output token: input 4,384 and output
    1,211 tokens, so input + output / 2 = 4,989), request lengths varying as an exponential
    distribution does (coefficient of variation 1)."""

    request_rate: float | None = None
    input_len: float = 4384
    output_len: float = 1211
    cache_hit: float = 0.0
    length_cv: float = 1.0
    ttft_ms: float = 5000
    itl_ms: float = 100
    balancedness: float = 0.77
    """EPLB's mean / max rank load at the reference width (decode EP144, 2 slots a rank): what the
    project's EPLB bench measures there for a Zipf(0.6) expert load (bench/eplb.py); no
    publication states it."""
    usd_per_gpu_hour: float = 2.0  # DeepSeek's assumption for an H800 (day-6 overview)
    precision: Precision = field(default_factory=Precision)  # of the KV cache, experts, attention
    techniques: Techniques = field(default_factory=Techniques)  # prefill parallelism, MTP, offload, cap


@dataclass
class Layout:
    prefill_ep: int
    decode_ep: int
    prefill_groups: int
    decode_groups: int
    gpus: int
    input_tokens_per_s_per_node: float
    output_tokens_per_s_per_node: float
    ttft_ms: float
    itl_ms: float
    usd_per_million_output_tokens: float
    decode_batch_per_gpu: int = 0
    """Requests one decode GPU runs at once at its operating point (HBM and the ITL target bound it)."""
    decode_step_ms: float = 0.0
    prefill_chunk_per_gpu: int = 0
    """New tokens one prefill GPU takes a step."""
    prefill_utilization: float = 0.0
    """The share of its capacity prefill runs at, so that queueing stays within the TTFT target."""
    input_tokens_per_s_per_gpu: float = 0.0
    output_tokens_per_s_per_gpu: float = 0.0
    """The per-node figures per GPU: the unit Blackwell publications report in."""
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("notes")
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


class Infeasible(ValueError):
    """A layout that cannot meet the targets (or hold the model) at all; the message says why, and
    `code` (does_not_fit, no_kv_room, itl_unreachable, ttft_unreachable, nothing_serves), `role`
    and `ep` say it to a program."""

    def __init__(
        self, message: str, code: str = "nothing_serves", role: str | None = None, ep: int | None = None
    ):
        super().__init__(message)
        self.code, self.role, self.ep = code, role, ep

    def as_json(self) -> dict[str, Any]:
        return {"code": self.code, "role": self.role, "ep": self.ep, "message": str(self)}
