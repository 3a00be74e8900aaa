"""Options of one worker instance: its role, ports, KV hand-off, expert parallelism and engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.engine import EngineConfig

Role = Literal["prefill", "decode"]


@dataclass(frozen=True)
class WorkerConfig:
    """How one instance (an EP group of `ep_size` ranks, rank 0 serving its port) runs."""

    role: Role
    """prefill: computes prompts and hands KV off; decode: receives KV and generates."""
    model: Path
    """Hugging Face style model directory."""
    host: str = "127.0.0.1"
    """Address the gRPC server binds and the transfer engine advertises."""
    port: int = 30001
    """gRPC port (SglangScheduler and, on prefill, KVHandoff: it doubles as the bootstrap port)."""
    served_model_name: str = ""
    """Model name reported to routers; default: the model directory's name."""
    transfer_protocol: Literal["tcp", "rdma"] = "tcp"
    """Mooncake transport for KV pages."""
    transfer_device: str = ""
    """RDMA device(s) for Mooncake, e.g. mlx5_0; empty for tcp."""
    kv_push: Literal["layerwise", "complete"] = "layerwise"
    """Prefill: write KV layer by layer during compute, or all at once after the prompt."""
    handoff_timeout_s: float = 30.0
    """Longest wait for the other side of a room (Generate or Attach) to show up."""
    prefill_timeout_s: float = 300.0
    """Longest a decode rank waits for a prefill to deliver a prompt's KV."""
    ep_size: int = 1
    """Ranks in this instance's expert-parallel group (one process each)."""
    ep_slots: int = 0
    """Physical expert slots across the group (0: one per routed expert); extra slots hold replicas."""
    dispatcher: Literal["torch", "deepep"] = "torch"
    """Token exchange backend for expert parallelism."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Each rank's engine (page_size, kv_pool_tokens, max_num_seqs, dtype, ...)."""

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode, got {self.role!r}")
        if self.ep_size < 1:
            raise ValueError(f"--ep must be >= 1, got {self.ep_size}")
        if self.kv_push not in ("layerwise", "complete"):
            raise ValueError(f"kv_push must be layerwise or complete, got {self.kv_push!r}")
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", Path(self.model).name)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = str(self.model)
        d["engine"] = {k: v for k, v in d["engine"].items() if v is not None}
        return d
