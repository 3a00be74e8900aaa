"""What a worker says about itself, read as SGLang and moeserve mean it.

SGLang's GetServerInfo reports its raw command-line arguments (resolution happens in the worker),
its GetModelInfo a `max_context_length` that is the KV pool's size; moeserve's workers answer the
same RPCs consistently. These functions turn either into the instance's facts.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

from smg_grpc_proto import sglang_scheduler_pb2 as pb

from services.common import wire
from services.proto.moeserve.v1 import worker_control_pb2 as ctl


@dataclass(frozen=True)
class DpLoad:
    """One DP rank's load as its worker reports it."""

    dp_rank: int
    running: int
    waiting: int
    kv_used_tokens: int
    kv_total_tokens: int
    kv_transfer_latency_ms: float = 0.0
    """Prefill: mean time its KV writes took per handed-off request (0 on decode)."""
    kv_transfer_gb_s: float = 0.0
    """Prefill: KV bytes written per second of writing."""


A2A_EP_BACKENDS = frozenset(
    {"deepep", "deepep_v2", "mooncake", "nixl", "mori", "pplx", "flashinfer", "megamoe", "ascend_fuseep"}
)
"""SGLang's all-to-all MoE backends that span the whole TP group: with one, its EP size is the TP
size whatever `--ep-size` says (SGLang resolves it; GetServerInfo reports the raw argument)."""


def context(info: pb.GetModelInfoResponse) -> int:
    """The longest sequence the worker takes: SGLang's `max_req_input_len` (the prompt it accepts,
    below both the model's context and the KV pool) + 1; `max_context_length` if that is unset."""
    prompt: int = info.max_req_input_len
    whole_context: int = info.max_context_length
    return prompt + 1 if prompt > 0 else whole_context


def balancedness(res: ctl.GetExpertLoadResponse) -> float | None:
    """Mean ÷ max tokens per EP rank under the placement in use (an expert's tokens split over its
    replicas), averaged over the MoE layers (1.0 = even); None without loads."""
    ranks, num_slots = max(1, res.ep_size), res.num_slots or res.num_experts
    ratios = []
    for i, layer in enumerate(res.layers):
        tokens = list(layer.tokens_per_expert)
        held = list(res.phy2log[i * num_slots : (i + 1) * num_slots]) or [
            s % len(tokens) for s in range(num_slots)
        ]
        copies = collections.Counter(held)
        per_slot = [tokens[e] / copies[e] for e in held]
        per_rank = len(held) // ranks
        loads = [sum(per_slot[r * per_rank : (r + 1) * per_rank]) for r in range(ranks)]
        if per_rank and max(loads):
            ratios.append(sum(loads) / ranks / max(loads))
    return sum(ratios) / len(ratios) if ratios else None


def ep_size(args: dict[str, Any]) -> int:
    """The instance's EP size: SGLang's as it resolves it (`A2A_EP_BACKENDS`), else `ep_size`."""
    ep, tp = whole(args.get("ep_size")), whole(args.get("tp_size"))
    if str(args.get("moe_a2a_backend") or "none") in A2A_EP_BACKENDS and tp > 0:
        return tp
    return ep


def slots(args: dict[str, Any]) -> int:
    """The instance's running window. `max_running_requests` is in the units of SGLang's flag:
    attention DP splits it over its ranks (the servicer reports the whole), while each replica of
    plain DP (`--dp-size` without `--enable-dp-attention`) runs all of it. moeserve reports its
    whole worker, as attention DP does."""
    window = whole(args.get("max_running_requests"))
    if args.get(wire.SERVER_ARG) is True or args.get("enable_dp_attention") is True:
        return window
    return window * max(1, whole(args.get("dp_size")))


def whole(value: Any) -> int:
    """A whole number from a server argument (Struct numbers are floats), else 0."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value == int(value):
        return int(value)
    return int(value) if isinstance(value, str) and value.isdigit() else 0


def server_args(server: pb.GetServerInfoResponse) -> dict[str, Any]:
    return dict(server.server_args.items()) if server.HasField("server_args") else {}
