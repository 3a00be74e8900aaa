"""The SGLang scheduler gRPC service (`SglangScheduler`) of an instance, served by rank 0.

Implemented: Generate, Abort and HealthCheck here; GetModelInfo, GetServerInfo, GetLoads and
GetTokenizer (`info_rpcs`); SubscribeKvEvents and FlushCache (`cache_rpcs`); everything else
answers UNIMPLEMENTED. A thin adapter: each call is placed on a DP rank and
handed to it through the DP controller; the rank's answer (or failure status) comes back as is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import NoReturn, cast

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from services.common import wire
from services.common.calls import CallError
from services.engine import Engine
from services.worker import messages as msg
from services.worker.config import WorkerConfig
from services.worker.faults import Refusals
from services.worker.front.cache_rpcs import PrefixCacheRpcs
from services.worker.front.dp_controller import DPController
from services.worker.front.info_rpcs import INFO_TIMEOUT_S, CallCounts, InstanceInfo

HEALTH_ASK_S = 8.0
"""How long HealthCheck waits for every rank's answer. A rank answers between engine steps, and on
a loaded host those can take seconds: 2 s once failed healthy instances under load. This stays
under the orchestrator's HealthCheck deadline (25 s) and the image's health check (9 s)."""


def abort_with(context: grpc.ServicerContext, e: CallError) -> NoReturn:
    """End the RPC with the rank's status (and whose failure it is, when another instance's)."""
    if e.peer:
        context.set_trailing_metadata(((wire.FAILED_PEER, e.peer),))
    context.abort(grpc.StatusCode[e.code], e.message)


class SchedulerServicer(pb_grpc.SglangSchedulerServicer):  # type: ignore[misc]  # smg_grpc_proto is untyped
    """SGLang's scheduler service for the whole instance."""

    def __init__(
        self,
        config: WorkerConfig,
        engine: Engine,
        controller: DPController,
        calls: CallCounts,
        refusals: Refusals,
    ) -> None:
        self.config, self.ctl, self.refusals = config, controller, refusals
        self.info = InstanceInfo(config, engine, controller, calls)
        self.cache = PrefixCacheRpcs(controller, engine.config.page_size)

    # -- generation ------------------------------------------------------------------------------

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        if self.refusals.take():  # fault injection (tests): refuse as an overloaded worker would
            context.abort(grpc.StatusCode.UNAVAILABLE, Refusals.MESSAGE)
        ctl = self.ctl
        forward, prefill_rank, feed = False, None, ""
        if self.config.role == "decode":
            # str values: our keys are not binary ("-bin") ones, whose values alone come as bytes.
            metadata = cast(Iterable[tuple[str, str]], context.invocation_metadata())
            forward, prefill_rank, feed = wire.requested(metadata)
        pinned = request.data_parallel_rank if request.HasField("data_parallel_rank") else None
        dp = request.disaggregated_params if request.HasField("disaggregated_params") else None
        room = (
            dp.bootstrap_room
            if dp is not None and dp.bootstrap_host and self.config.role == "prefill"
            else None
        )
        try:
            rank = ctl.place(pinned) if room is None else ctl.enter_room(room, lambda: ctl.place(pinned))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        ctl.started(rank)
        try:
            call = ctl.call(
                rank, lambda cid: msg.Generate(cid, request.SerializeToString(), forward, prefill_rank, feed)
            )
            if not context.add_callback(call.cancel):
                call.cancel()  # the caller went away before the callback was in place
            try:
                for data in call:
                    yield pb.GenerateResponse.FromString(data)
            except CallError as e:
                abort_with(context, e)
        finally:
            ctl.finished(rank)
            if room is not None:
                ctl.leave_room(room)

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        rid = request.request_id
        calls = [self.ctl.call(r, lambda cid: msg.Abort(cid, rid)) for r in range(self.ctl.size)]
        found = False
        for call in calls:
            with contextlib.suppress(CallError):  # a rank that is down holds nothing to abort
                found |= bool(call.result(INFO_TIMEOUT_S))
        return pb.AbortResponse(success=found, message="aborted" if found else f"no live request {rid!r}")

    # -- information ---------------------------------------------------------------------------

    def HealthCheck(
        self, request: pb.HealthCheckRequest, context: grpc.ServicerContext
    ) -> pb.HealthCheckResponse:
        try:
            health = self.ctl.ask_all("health", timeout=HEALTH_ASK_S)
        except CallError as e:
            return pb.HealthCheckResponse(healthy=False, message=e.message)
        for rank, h in enumerate(health):
            if not h.healthy:
                return pb.HealthCheckResponse(healthy=False, message=f"EP rank {rank}: {h.message}")
        return pb.HealthCheckResponse(healthy=True, message=f"ok ({self.ctl.size} ranks)")

    def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return self.info.model_info()

    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return self.info.server_info(context)

    def GetLoads(self, request: pb.GetLoadsRequest, context: grpc.ServicerContext) -> pb.GetLoadsResponse:
        return self.info.loads(request, context)

    def GetTokenizer(
        self, request: common_pb2.GetTokenizerRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.GetTokenizerChunk]:
        return self.info.tokenizer()

    # -- prefix cache --------------------------------------------------------------------------

    def SubscribeKvEvents(
        self, request: common_pb2.SubscribeKvEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.KvEventBatch]:
        return self.cache.subscribe(request, context)

    def FlushCache(
        self, request: common_pb2.FlushCacheRequest, context: grpc.ServicerContext
    ) -> common_pb2.FlushCacheResponse:
        return self.cache.flush()

    # -- not served (the generated defaults would also log a traceback per call) ----------------

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> NoReturn:
        unimplemented(context, "Embed")

    def StartProfile(
        self, request: common_pb2.StartProfileRequest, context: grpc.ServicerContext
    ) -> NoReturn:
        unimplemented(context, "StartProfile")

    def StopProfile(self, request: common_pb2.StopProfileRequest, context: grpc.ServicerContext) -> NoReturn:
        unimplemented(context, "StopProfile")

    def LoadLoRAAdapter(self, request: pb.LoadLoRAAdapterRequest, context: grpc.ServicerContext) -> NoReturn:
        unimplemented(context, "LoadLoRAAdapter")

    def UnloadLoRAAdapter(
        self, request: pb.UnloadLoRAAdapterRequest, context: grpc.ServicerContext
    ) -> NoReturn:
        unimplemented(context, "UnloadLoRAAdapter")

    def ListLoadedLoRAAdapters(
        self, request: pb.ListLoadedLoRAAdaptersRequest, context: grpc.ServicerContext
    ) -> NoReturn:
        unimplemented(context, "ListLoadedLoRAAdapters")


def unimplemented(context: grpc.ServicerContext, name: str) -> NoReturn:
    context.abort(grpc.StatusCode.UNIMPLEMENTED, f"moeserve workers do not implement {name}")
    raise AssertionError("unreachable")  # abort raises
