"""Run a function on W local processes joined by torch.distributed (gloo on loopback).

For tests and benchmarks that need a real group on one machine; serving instances are launched
by `services.worker.supervisor`. With `nodes` > 1 the ranks split over that many "nodes", node n
on address 127.0.0.{n+1}, and meet the way a multi-node instance's ranks do (node 0's store).
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.common.process import free_port


def _join_as_node(rank: int, world: int, port: int, nodes: int) -> None:
    from services.worker.config import WorkerConfig
    from services.worker.rendezvous import join_group

    node = rank // (world // nodes)
    config = WorkerConfig(
        role="decode",
        model=Path("unused"),
        host=f"127.0.0.{node + 1}",
        ep_size=world,
        nnodes=nodes,
        node_rank=node,
        dist_init_addr=f"127.0.0.1:{port}",
    )
    join_group(config, rank, None)


def _entry(
    rank: int, world: int, port: int, backend: str, nodes: int, fn: Callable, args: tuple, results
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        if nodes > 1:
            _join_as_node(rank, world, port, nodes)
        else:
            dist.init_process_group(
                backend,
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=60),
            )
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    world: int, fn: Callable, *args: Any, timeout: float = 240, backend: str = "gloo", nodes: int = 1
) -> list[Any]:
    """fn(rank, world, *args) on every rank; returns the results in rank order, raising on any error.

    backend "nccl" puts rank r on GPU r; `nodes` > 1 (gloo only) forms the group as that many nodes.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, backend, nodes, fn, args, results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in procs if p.exitcode is not None and p.exitcode != 0]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"ranks did not report ({', '.join(dead) or 'timeout'})") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]
