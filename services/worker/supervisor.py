"""An instance: one expert-parallel group of W ranks, rank 0 serving the instance's gRPC port.

With W = 1 the worker process is rank 0. With W > 1 it is a launcher: it starts W rank processes
(joined by torch.distributed for the MoE exchanges, and by ZeroMQ for the calls rank 0 hands the
others), reports when all are ready, and supervises them. The group fails as a unit: when a rank
exits, the instance turns unhealthy, in-flight calls fail with a status, and all ranks stop.
Stop is ordered: the engines agree to stop at the same step (no collective is left hanging),
calls still running end with UNAVAILABLE, then the gRPC server closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from services.common.logs import setup_logging
from services.common.process import die_with_parent, stop_on_signals
from services.worker.config import WorkerConfig

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from services.ep import ExpertParallel, ExpertPlacement
    from services.models import ModelConfig

READY_TIMEOUT_S = 300.0
FAILURE_GRACE_S = 2.0
"""After a rank dies, how long the survivors keep answering (unhealthy) before the group stops."""
STOP_TIMEOUT_S = 3.0
SERVER_GRACE_S = 0.5


def dispatcher_options(config: WorkerConfig) -> dict[str, Any]:
    """Backend arguments from the worker's config (DeepEP's per-rank caps, the same on every rank)."""
    if config.dispatcher != "deepep":
        return {}
    e = config.engine
    return dict(
        max_tokens_per_rank=max(e.max_prefill_tokens, e.max_num_seqs),
        decode_tokens_per_rank=e.max_num_seqs,
        expanded_decode=config.deepep_mode == "auto",
    )


def serve(config: WorkerConfig) -> int:
    """Run the instance until SIGINT/SIGTERM (0) or a rank failure (1)."""
    if config.ep_size == 1:
        stop = stop_on_signals()
        return run_rank(config, 0, None, stop, None)
    return supervise(config)


def initial_placement(config: WorkerConfig, cfg: ModelConfig, world: int) -> ExpertPlacement:
    """The group's placement: from `--ep-placement FILE`, or slot s holding expert s mod experts."""
    from services.ep import ExpertPlacement

    layers = len(cfg.moe_layers)
    if not config.ep_placement:
        slots = config.ep_slots or cfg.num_experts
        return ExpertPlacement.default(layers, cfg.num_experts, slots, world, config.nnodes)
    from services.eplb.files import read_placement

    phy2log = read_placement(Path(config.ep_placement), layers, cfg.num_experts, world)
    if config.ep_slots and config.ep_slots != phy2log.shape[1]:
        slots = phy2log.shape[1]
        raise ValueError(f"--ep-slots {config.ep_slots} disagrees with {config.ep_placement}'s {slots} slots")
    return ExpertPlacement(cfg.num_experts, world, phy2log, config.nnodes)


def run_rank(
    config: WorkerConfig, rank: int, dist_init: str | None, stop: threading.Event, report: Connection | None
) -> int:
    """Build and run one rank until `stop` (or its group stops); rank 0 serves the public port."""
    import torch
    import torch.distributed as dist
    import zmq

    from services.engine import Engine
    from services.ep import ExpertLoadRecorder, ExpertParallel, create
    from services.worker.channels import Link, LocalLink, ZmqReceiver, ZmqSender
    from services.worker.front.dp_controller import DPController
    from services.worker.front.metrics import serve_metrics
    from services.worker.front.server import add_services, bind_server
    from services.worker.rank.kv_handoff_client import GrpcAttachClient
    from services.worker.rank.rank import Rank
    from services.worker.rendezvous import join_group, rank_device

    world = config.ep_size
    server = metrics = None
    if rank == 0:  # take the public port first: ports drawn later (ZeroMQ, Mooncake) cannot collide
        server, counter, port = bind_server(config)
    engine_config = config.engine
    device = rank_device(config, rank)
    if device.type == "cuda":  # one GPU per rank
        torch.cuda.set_device(device)
        engine_config = dataclasses.replace(engine_config, device=str(device))
    parallel, control = None, None
    if world > 1:
        control = join_group(config, rank, dist_init)
        dispatcher = create(config.dispatcher, **dispatcher_options(config))

        def parallel(cfg: ModelConfig) -> ExpertParallel:
            placement = initial_placement(config, cfg, world)
            dispatcher.validate(cfg.hidden_size, config.engine.dtype, placement.num_slots)
            recorder = ExpertLoadRecorder(len(cfg.moe_layers), cfg.num_experts)
            return ExpertParallel(placement, rank, dispatcher, recorder, control)

    def progress(line: str) -> None:
        if rank == config.local_ranks.start:  # one rank per node speaks for the load
            print(f"moeserve worker: rank {rank}: {line}", file=sys.stderr, flush=True)

    engine = Engine.from_pretrained(
        config.model, parallel=parallel, report=progress, **dataclasses.asdict(engine_config)
    )
    me = Rank(config, engine, GrpcAttachClient())
    zctx = zmq.Context()
    controller: DPController | None = None
    receiver = None
    peers: list[dict[str, Any]] = [{"pid": os.getpid()}]
    if world > 1:
        # Rank 0 receives events for its controller (made below, before any event can come); the
        # others receive calls.
        handle = (lambda e: controller.on_event(e)) if rank == 0 else me.handle  # type: ignore[union-attr]
        receiver = ZmqReceiver(zctx, config.host, config.advertised, handle, f"rank{rank}")
        peers = [{} for _ in range(world)]
        dist.all_gather_object(peers, {"address": receiver.address, "pid": os.getpid()}, group=control)
    if server is not None:
        links: list[Link] = [LocalLink(me.handle)] + [ZmqSender(zctx, p["address"]) for p in peers[1:]]
        controller = DPController(links, [p["pid"] for p in peers])
        me.reply = controller.on_event
        me.loop.add_stop_callback(lambda e: controller.fail_all(f"the instance's engine stopped: {e}"))
        add_services(server, counter, config, engine, controller)
        if config.metrics_port:
            metrics = serve_metrics(config, engine, controller, counter)
    else:
        me.reply = ZmqSender(zctx, peers[0]["address"]).send
    me.loop.add_stop_callback(lambda e: stop.set())  # the group stopped (or died): leave too
    me.start()  # before any call can arrive
    if receiver is not None:
        receiver.start()
    if server is not None:
        server.start()
    detail = (
        (f"metrics={config.host}:{config.metrics_port} " if metrics is not None else "")
        + f"kv={me.layout.describe()} transfer={me.transfer.session_id}/{config.transfer_protocol} "
        f"weights: {engine.model.load_report.summary()}"  # type: ignore[union-attr]  # set by from_pretrained
    )
    if report is not None:
        report.send(("ready", rank, detail))
    elif rank == 0:
        print(f"moeserve worker ready: role={config.role} grpc={config.host}:{port} {detail}", flush=True)
    stop.wait()
    me.loop.stop(timeout=STOP_TIMEOUT_S)  # every rank leaves at the same step
    if server is not None:
        server.stop(SERVER_GRACE_S).wait()
    if metrics is not None:
        metrics.shutdown()
    if receiver is not None:
        receiver.close()
    return 1 if me.loop.crashed else 0


def rank_process(config: WorkerConfig, rank: int, dist_init: str, report: Connection) -> None:
    """Entry point of one rank process of a group."""
    die_with_parent()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    setup_logging()  # as the launcher's options set it (they travel in the environment)
    stop = stop_on_signals()
    try:
        code = run_rank(config, rank, dist_init, stop, report)
    except BaseException as e:  # tell the launcher why, then exit non-zero
        with contextlib.suppress(OSError):
            report.send(("error", rank, f"{type(e).__name__}: {e}"))
        code = 1
    report.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Threads of finished calls may linger in their pools; the work is done, leave now.
    os._exit(code)


def supervise(config: WorkerConfig) -> int:
    """Launch this node's rank processes and watch them until a signal or a rank failure."""
    ctx = mp.get_context("spawn")
    # The ranks of a one-host group meet through a file: no port to pick, so none to lose to a race.
    rendezvous = tempfile.mkdtemp(prefix="moeserve-ep-")
    dist_init = f"file://{rendezvous}/store"
    ranks = config.local_ranks
    pipes = [ctx.Pipe(duplex=False) for _ in ranks]
    procs = [
        ctx.Process(target=rank_process, args=(config, r, dist_init, pipe[1]), name=f"ep-rank-{r}")
        for r, pipe in zip(ranks, pipes, strict=True)
    ]
    stop = stop_on_signals()
    for p in procs:
        p.start()
    for _, sender in pipes:
        sender.close()
    try:
        ready = wait_ready(config, procs, [reader for reader, _ in pipes], stop)
        if ready is None:
            return 1
        if config.node_rank == 0:
            slots = config.ep_placement or config.ep_slots or "experts"
            print(
                f"moeserve worker ready: role={config.role} grpc={config.host}:{config.port} "
                f"ep={config.ep_size} nodes={config.nnodes} slots={slots} "
                f"dispatcher={config.dispatcher} {ready}",
                flush=True,
            )
        else:
            print(
                f"moeserve worker ready: node {config.node_rank} of {config.nnodes} (EP ranks "
                f"{ranks.start}-{ranks.stop - 1}) joined the group at {config.dist_init_addr}",
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
                p.terminate()  # each rank asks its engine to stop; they agree and leave together
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join()
        shutil.rmtree(rendezvous, ignore_errors=True)


def wait_ready(
    config: WorkerConfig, procs: Sequence[BaseProcess], readers: list[Connection], stop: threading.Event
) -> str | None:
    """This node's first rank's description once all its ranks are ready; None (after saying why)."""
    ready: dict[int, str] = {}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(ready) < len(procs):
        if time.monotonic() > deadline or stop.is_set():
            print("moeserve worker: EP ranks did not come up in time", file=sys.stderr)
            return None
        # wait() returns those of the objects given that are ready: here, readers.
        ready_readers = cast(list[Connection], wait([r for r in readers if not r.closed], timeout=0.5))
        for reader in ready_readers:
            try:
                kind, rank, detail = reader.recv()
            except EOFError:
                reader.close()
                continue
            if kind == "error":
                print(f"moeserve worker: EP rank {rank} failed to start: {detail}", file=sys.stderr)
                return None
            ready[rank] = detail
        dead = [p.name for p in procs if p.exitcode is not None]
        if dead and len(ready) < len(procs):
            print(f"moeserve worker: {', '.join(dead)} exited during start-up", file=sys.stderr)
            return None
    return ready[config.local_ranks.start]
