"""Rank 0's gRPC server: SglangScheduler, WorkerControl and (prefill) KVHandoff on the instance's port."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

from services.common import wire
from services.engine import Engine
from services.proto.moeserve.v1 import kv_handoff_pb2_grpc as kvpb_grpc
from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc
from services.worker.config import WorkerConfig
from services.worker.faults import Refusals
from services.worker.front.control_rpcs import ControlServicer
from services.worker.front.dp_controller import DPController
from services.worker.front.first_token_feeds import FirstTokenFeeds
from services.worker.front.kv_handoff_rpcs import KVHandoffServicer
from services.worker.front.sglang_rpcs import SchedulerServicer

MAX_RPC_THREADS = 2048
"""Each streaming Generate and each Attach holds a thread for its lifetime (well above the
orchestrator's default admission limit, so short calls still find one)."""


class CallCounter(grpc.ServerInterceptor):
    """Counts the calls this server receives per method (reported in GetServerInfo)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        with self._lock:
            self.counts[handler_call_details.method.rsplit("/", 1)[-1]] += 1
        return continuation(handler_call_details)


class TokenCheck(grpc.ServerInterceptor):
    """Refuses every call that lacks the workers' shared token (`wire.TOKEN_ENV`) with UNAUTHENTICATED."""

    def __init__(self, token: str):
        self.token = token

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"this worker needs its gRPC token: send metadata {wire.AUTH_KEY}: Bearer <{wire.TOKEN_ENV}>",
            )

        self._deny: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if wire.authorized(handler_call_details.invocation_metadata, self.token):
            return continuation(handler_call_details)
        return self._deny


def bind_server(config: WorkerConfig) -> tuple[grpc.Server, CallCounter, int]:
    """The instance's gRPC server bound to config.host:config.port, before anything else takes the
    port; with a gRPC token set (`wire.TOKEN_ENV`), calls without it are refused."""
    counter = CallCounter()
    token = wire.grpc_token()
    interceptors: list[grpc.ServerInterceptor] = [TokenCheck(token)] if token else []
    interceptors.append(counter)  # (a refused call is not counted)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_RPC_THREADS), interceptors=interceptors)
    address = f"{config.host}:{config.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind the gRPC server to {address}; is the port in use?")
    return server, counter, port


def add_services(
    server: grpc.Server, counter: CallCounter, config: WorkerConfig, engine: Engine, controller: DPController
) -> None:
    """SglangScheduler, WorkerControl and (prefill) KVHandoff, all over `controller`."""
    refusals = Refusals()
    pb_grpc.add_SglangSchedulerServicer_to_server(
        SchedulerServicer(config, engine, controller, counter, refusals), server
    )
    control = ControlServicer(engine, controller, config.eplb_interval_s, config.eplb_tolerance)
    # grpc_tools generates these registration functions without annotations.
    ctl_grpc.add_WorkerControlServicer_to_server(control, server)  # type: ignore[no-untyped-call]
    if config.role == "prefill":
        handoff = KVHandoffServicer(controller, refusals, FirstTokenFeeds())
        kvpb_grpc.add_KVHandoffServicer_to_server(handoff, server)  # type: ignore[no-untyped-call]
