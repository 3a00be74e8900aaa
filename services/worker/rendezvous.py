"""Where an instance's ranks meet before they form their process group.

On one host they meet through a file store (no port to pick, so none to lose to a race). Across
nodes they meet at node 0's TCP store (`--dist-init-addr`): every rank announces itself there
first, so a node that never comes is named in the error instead of surfacing as a bare timeout.
torch's TCP store listens on every interface of node 0 (the library offers no bind address).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from services.worker.config import WorkerConfig


def rank_device(config: WorkerConfig, rank: int) -> torch.device:
    """The rank's device: `cuda:{local rank}` when the engine runs on CUDA (one GPU per rank), else CPU."""
    if not config.engine.device.startswith("cuda"):
        return torch.device("cpu")
    return torch.device("cuda", rank - config.local_ranks.start)


class RendezvousError(RuntimeError):
    """The group could not form: which node is missing, or which store could not be reached."""


def join_group(config: WorkerConfig, rank: int, file_store: str | None) -> dist.ProcessGroup | None:
    """Form the instance's default process group as global rank `rank`.

    On CPU that is one gloo group for everything. On GPUs the default group is NCCL, initialised
    eagerly on the rank's own device (DeepEP cannot reuse a lazily created communicator), and the
    returned gloo group carries the control traffic (the per-step agreement, address exchange).
    Returns None when the default group serves for control too.
    """
    world = config.ep_size
    timeout = timedelta(seconds=config.dist_timeout_s)
    device = rank_device(config, rank)
    eager: dict[str, Any]  # extra init_process_group keywords
    backend, eager = ("nccl", {"device_id": device}) if device.type == "cuda" else ("gloo", {})
    if config.nnodes == 1:
        dist.init_process_group(
            backend, init_method=file_store, rank=rank, world_size=world, timeout=timeout, **eager
        )
        return dist.new_group(backend="gloo") if backend == "nccl" else None
    addr = config.dist_init_addr
    host, port = addr.rsplit(":", 1)
    try:
        # torch.distributed re-exports TCPStore/PrefixStore from torch._C without marking them public.
        store = dist.TCPStore(  # type: ignore[attr-defined]
            host, int(port), world, is_master=rank == 0, timeout=timeout, wait_for_workers=False
        )
    except Exception as e:  # torch raises several kinds here (DistNetworkError, RuntimeError)
        raise RendezvousError(
            f"node {config.node_rank}: cannot reach the group's store at {addr} (node 0) "
            f"within {config.dist_timeout_s:.0f}s: {e}"
        ) from None
    store.set(_key(rank), str(config.node_rank))
    if rank == 0:
        try:
            store.wait([_key(r) for r in range(world)], timeout)
        except Exception:
            missing = [r for r in range(world) if not store.check([_key(r)])]
            per_node = world // config.nnodes
            nodes = sorted({r // per_node for r in missing})
            raise RendezvousError(
                f"node(s) {', '.join(map(str, nodes))} of {config.nnodes} did not join the EP{world} "
                f"group at {addr} within {config.dist_timeout_s:.0f}s; start them with --node-rank"
            ) from None
    prefix_store = dist.PrefixStore("group", store)  # type: ignore[attr-defined]  # as TCPStore above
    dist.init_process_group(
        backend, store=prefix_store, rank=rank, world_size=world, timeout=timeout, **eager
    )
    return dist.new_group(backend="gloo") if backend == "nccl" else None


def _key(rank: int) -> str:
    return f"moeserve/arrived/{rank}"
