"""A worker process: engine + engine loop + transfer engine + gRPC server."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures

import grpc
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

from services.engine import Engine
from services.ep import ExpertParallel
from services.kv import KVLayout, KVRegion, TransferEngine
from services.models import ModelConfig
from services.proto.moeserve.v1 import kv_handoff_pb2_grpc as kvpb_grpc
from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc
from services.worker.config import WorkerConfig
from services.worker.control import ControlServicer
from services.worker.decode import DecodeSide
from services.worker.engine_loop import EngineLoop
from services.worker.prefill import PrefillSide
from services.worker.servicer import SchedulerServicer

log = logging.getLogger(__name__)
MAX_RPC_THREADS = 256  # each streaming Generate holds one thread for its lifetime


class Worker:
    """One engine (one DP rank) with its gRPC services; `parallel` makes it a rank of an EP group."""

    def __init__(self, config: WorkerConfig, parallel: Callable[[ModelConfig], ExpertParallel] | None = None):
        self.config = config
        self.engine = Engine.from_pretrained(config.model, parallel=parallel, **config.engine)
        self.loop = EngineLoop(self.engine)
        self.layout = KVLayout(
            self.engine.model_config.architecture,
            self.engine.model_config.num_layers,
            tuple(self.engine.model_config.kv_entry_shape),
            self.engine.config.dtype,
            self.engine.config.page_size,
        )
        storage = self.engine.kv.storage
        self.region = KVRegion(
            base=storage.data_ptr(),
            layer_stride=storage[0].nbytes,
            entry_bytes=self.layout.entry_bytes,
            page_size=self.layout.page_size,
        )
        self.transfer = TransferEngine(config.host, config.transfer_protocol, config.transfer_device)
        self.transfer.register(storage.data_ptr(), storage.nbytes)
        if config.role == "prefill":
            self.side: PrefillSide | DecodeSide = PrefillSide(
                self.loop, self.layout, self.region, self.transfer, config.handoff_timeout_s, config.kv_push
            )
        else:
            self.side = DecodeSide(
                self.loop,
                self.layout,
                self.region,
                self.transfer.session_id,
                config.handoff_timeout_s,
                config.prefill_timeout_s,
            )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_RPC_THREADS))
        pb_grpc.add_SglangSchedulerServicer_to_server(
            SchedulerServicer(config, self.loop, self.side), self.server
        )
        if isinstance(self.side, PrefillSide):
            kvpb_grpc.add_KVHandoffServicer_to_server(self.side, self.server)
        ctl_grpc.add_WorkerControlServicer_to_server(ControlServicer(self.loop), self.server)
        address = f"{config.host}:{config.port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC server to {address}; is the port in use?")

    def start(self) -> None:
        self.loop.start()
        self.server.start()

    def stop(self, grace: float = 2.0) -> None:
        self.server.stop(grace).wait()
        self.loop.stop()


def stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def serve(config: WorkerConfig) -> None:
    """Run a single-rank worker until SIGINT/SIGTERM."""
    worker = Worker(config)
    worker.start()
    stop = stop_on_signals()
    print(
        f"moeserve worker ready: role={config.role} grpc={config.host}:{worker.port} "
        f"kv={worker.layout.describe()} transfer={worker.transfer.session_id}/{config.transfer_protocol}",
        flush=True,
    )
    stop.wait()
    worker.stop()
