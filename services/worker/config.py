"""Options of one worker instance: its role, ports, KV hand-off, expert parallelism and engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.common.roles import Role
from services.engine import EngineConfig

TransferProtocol = Literal["tcp", "rdma"]
"""Mooncake transports: RDMA on clusters, TCP on one machine."""
KVPush = Literal["layerwise", "complete"]
DispatcherBackend = Literal["torch", "deepep"]
DeepEPMode = Literal["auto", "normal"]


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
    transfer_protocol: TransferProtocol = "tcp"
    """Mooncake transport for KV pages."""
    transfer_device: str = ""
    """RDMA device(s) for Mooncake, e.g. mlx5_0; empty for tcp."""
    kv_push: KVPush = "layerwise"
    """Prefill: write KV layer by layer during compute, or all at once after the prompt."""
    handoff_timeout_s: float = 30.0
    """Longest wait for the other side of a room (Generate or Attach) to show up."""
    prefill_timeout_s: float = 300.0
    """Longest a decode rank waits for a prefill to deliver a prompt's KV."""
    metrics_port: int = 0
    """Rank 0 serves Prometheus `/metrics` on host:metrics_port (0: off)."""
    ep_size: int = 1
    """Ranks in this instance's expert-parallel group (one process each)."""
    ep_slots: int = 0
    """Physical expert slots across the group (0: one per routed expert); extra slots hold replicas."""
    ep_placement: str = ""
    """A placement file (`moeserve eplb plan`): which expert each slot holds; sets the slot count."""
    eplb_interval_s: float = 0.0
    """Re-plan the placement from the load window this often and switch when it changes (0: never)."""
    eplb_tolerance: float = 0.01
    """Balancedness a re-plan may give up to move fewer slots."""
    nnodes: int = 1
    """Nodes the instance spans; each runs the same command but for --node-rank and --host."""
    node_rank: int = 0
    """This node's index; node 0 holds global rank 0, the leader that serves the instance's port."""
    dist_init_addr: str = ""
    """HOST:PORT on node 0 where the group's ranks meet (required with more than one node)."""
    dist_timeout_s: float = 60.0
    """Longest wait for every node to join the group at start-up."""
    advertise_host: str = ""
    """Address peers reach this node at, where it differs from `host` (e.g. a pod binding 0.0.0.0)."""
    dispatcher: DispatcherBackend = "torch"
    """Token exchange backend for expert parallelism."""
    deepep_mode: DeepEPMode = "auto"
    """deepep only: auto = decode steps through DeepEP's expanded layout (no host sync per MoE
    layer), prefill in normal mode; normal = normal mode for every step."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Each rank's engine (page_size, kv_pool_tokens, max_num_seqs, dtype, ...)."""

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode, got {self.role!r}")
        if self.ep_size < 1:
            raise ValueError(f"--ep must be >= 1, got {self.ep_size}")
        if self.nnodes < 1 or self.ep_size % self.nnodes:
            raise ValueError(f"--ep {self.ep_size} must split evenly over --nnodes {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and not _is_host_port(self.dist_init_addr):
            raise ValueError(
                f"an instance over {self.nnodes} nodes needs --dist-init-addr HOST:PORT on node 0, "
                f"got {self.dist_init_addr!r}"
            )
        if self.ep_placement and self.ep_size == 1:
            raise ValueError("--ep-placement places experts over EP ranks: it needs --ep 2 or more")
        if self.kv_push not in ("layerwise", "complete"):
            raise ValueError(f"kv_push must be layerwise or complete, got {self.kv_push!r}")
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", Path(self.model).name)

    @property
    def advertised(self) -> str:
        """The address peers use for this node's sockets (ZeroMQ, KV transfer)."""
        return self.advertise_host or self.host

    @property
    def local_ranks(self) -> range:
        """Global ranks that run on this node."""
        per_node = self.ep_size // self.nnodes
        return range(self.node_rank * per_node, (self.node_rank + 1) * per_node)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = str(self.model)
        d["engine"] = {k: v for k, v in d["engine"].items() if v is not None}
        return d


def _is_host_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit()
