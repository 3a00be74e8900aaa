"""Where an instance's ranks meet before they form their process group.

On one host they meet through a file store (no port to pick, so none to lose to a race). Across
nodes they meet at node 0's TCP store (`--dist-init-addr`): every rank announces itself there
first, so a node that never comes is named in the error instead of surfacing as a bare timeout.
torch's TCP store listens on every interface of node 0 (the library offers no bind address).
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from services.worker.config import WorkerConfig


class RendezvousError(RuntimeError):
    """The group could not form: which node is missing, or which store could not be reached."""


def join_group(config: WorkerConfig, rank: int, file_store: str | None) -> None:
    """Form the instance's default process group (gloo) as global rank `rank`."""
    world = config.ep_size
    timeout = timedelta(seconds=config.dist_timeout_s)
    if config.nnodes == 1:
        dist.init_process_group("gloo", init_method=file_store, rank=rank, world_size=world, timeout=timeout)
        return
    addr = config.dist_init_addr
    host, port = addr.rsplit(":", 1)
    try:
        store = dist.TCPStore(
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
    dist.init_process_group(
        "gloo", store=dist.PrefixStore("group", store), rank=rank, world_size=world, timeout=timeout
    )


def _key(rank: int) -> str:
    return f"moeserve/arrived/{rank}"
