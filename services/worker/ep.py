"""An expert-parallel instance: W rank processes joined by torch.distributed, one public port.

The launcher (this process) starts the ranks and watches them. Each rank runs a full worker on a
private loopback port, in lockstep with the others through its engine; rank 0 also serves the
instance's public port (`Front`). The group fails as a unit: when any rank exits, the instance is
reported unhealthy, in-flight requests fail with a status naming the rank, and all ranks stop.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import sys
import time
from concurrent import futures
from datetime import timedelta

from services.ep.launch import free_port
from services.worker.config import WorkerConfig

READY_TIMEOUT_S = 300.0
FAILURE_GRACE_S = 2.0
"""After a rank dies, how long the survivors keep answering (unhealthy) before the group stops."""


def rank_main(config: WorkerConfig, rank: int, dist_port: int, internal: list[int], events) -> None:
    """One rank process."""
    import ctypes
    import signal

    # A rank never outlives its launcher.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import grpc
    import torch
    import torch.distributed as dist
    from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

    from services.ep import ExpertLoadRecorder, ExpertParallel, ExpertPlacement, create
    from services.proto.moeserve.v1 import kv_handoff_pb2_grpc as kvpb_grpc
    from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc
    from services.worker.front import Front
    from services.worker.server import MAX_RPC_THREADS, Worker, stop_on_signals

    try:
        torch.set_num_threads(int(config.engine.get("num_threads") or 1))
        world = config.ep_size
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{dist_port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        dispatcher = create(config.dispatcher)

        def parallel(cfg):
            placement = ExpertPlacement.default(
                len(cfg.moe_layers), cfg.num_experts, config.ep_slots or cfg.num_experts, world
            )
            recorder = ExpertLoadRecorder(len(cfg.moe_layers), cfg.num_experts)
            return ExpertParallel(placement, rank, dispatcher, recorder)

        worker = Worker(dataclasses.replace(config, port=internal[rank]), parallel=parallel)
        worker.start()
        stop = stop_on_signals()
        server = None
        if rank == 0:
            front = Front([f"127.0.0.1:{p}" for p in internal])
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_RPC_THREADS))
            pb_grpc.add_SglangSchedulerServicer_to_server(front, server)
            ctl_grpc.add_WorkerControlServicer_to_server(front, server)
            if config.role == "prefill":
                kvpb_grpc.add_KVHandoffServicer_to_server(front, server)
            if server.add_insecure_port(f"{config.host}:{config.port}") == 0:
                raise OSError(f"cannot bind the instance's public port {config.host}:{config.port}")
            server.start()
        events.put(("ready", rank, f"{worker.layout.describe()} transfer={worker.transfer.session_id}"))
        stop.wait()
        if server is not None:
            server.stop(1).wait()
        worker.server.stop(1).wait()
    except BaseException as e:  # tell the launcher why, then exit non-zero
        events.put(("error", rank, f"{type(e).__name__}: {e}"))
        events.close()
        events.join_thread()
        os._exit(1)
    # The engine loop may sit in a collective whose peers are gone: leave without joining it.
    os._exit(0)


def serve_ep(config: WorkerConfig) -> int:
    """Launch and supervise the ranks until a signal or a rank failure."""
    from services.worker.server import stop_on_signals

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    dist_port = free_port()
    internal = [free_port() for _ in range(config.ep_size)]
    procs = [
        ctx.Process(target=rank_main, args=(config, r, dist_port, internal, events), name=f"ep-rank-{r}")
        for r in range(config.ep_size)
    ]
    stop = stop_on_signals()
    for p in procs:
        p.start()
    try:
        ready: dict[int, str] = {}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(ready) < config.ep_size:
            if time.monotonic() > deadline or stop.is_set():
                print("moeserve worker: EP ranks did not come up in time", file=sys.stderr)
                return 1
            try:
                kind, rank, detail = events.get(timeout=0.5)
            except queue.Empty:
                dead = [p.name for p in procs if p.exitcode is not None]
                if dead:
                    print(f"moeserve worker: {', '.join(dead)} exited during start-up", file=sys.stderr)
                    return 1
                continue
            if kind == "error":
                print(f"moeserve worker: EP rank {rank} failed to start: {detail}", file=sys.stderr)
                return 1
            ready[rank] = detail
        print(
            f"moeserve worker ready: role={config.role} grpc={config.host}:{config.port} ep={config.ep_size} "
            f"slots={config.ep_slots or 'experts'} dispatcher={config.dispatcher} kv={ready[0]}",
            flush=True,
        )
        while not stop.wait(0.2):
            dead = [p for p in procs if p.exitcode is not None]
            if dead:
                names = ", ".join(f"{p.name} (exit {p.exitcode})" for p in dead)
                print(f"moeserve worker: {names} died; the EP group fails as a unit", file=sys.stderr)
                time.sleep(FAILURE_GRACE_S)
                return 1
        return 0
    finally:
        for p in procs:
            if p.exitcode is None:
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.exitcode is None:
                p.kill()
