"""The SGLang scheduler gRPC service (`SglangScheduler`) of an instance, served by rank 0.

Implemented: Generate, Abort, HealthCheck, GetModelInfo, GetServerInfo, GetLoads, GetTokenizer,
SubscribeKvEvents and FlushCache (`cache_rpcs`);
everything else answers UNIMPLEMENTED. A thin adapter: each call is placed on a DP rank and
handed to it through the DP controller; the rank's answer (or failure status) comes back as is.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import os
import time
import zipfile
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path

import grpc
from google.protobuf import struct_pb2
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from services.common import wire
from services.common.calls import CallError
from services.engine import Engine
from services.kv.sender import TransferStats
from services.worker import messages as msg
from services.worker.config import WorkerConfig
from services.worker.faults import Refusals
from services.worker.front.cache_rpcs import PrefixCacheRpcs
from services.worker.front.dp_controller import DPController

VERSION = "moeserve-0.1.0"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)
CHUNK_BYTES = 1 << 20
INFO_TIMEOUT_S = 5.0
UNIMPLEMENTED_RPCS = (
    "Embed",
    "StartProfile",
    "StopProfile",
    "LoadLoRAAdapter",
    "UnloadLoRAAdapter",
    "ListLoadedLoRAAdapters",
)


def unimplemented_rpc(name: str):
    """A servicer method that answers UNIMPLEMENTED without logging a traceback."""

    def rpc(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"moeserve workers do not implement {name}")

    rpc.__name__ = name
    return rpc


def abort_with(context: grpc.ServicerContext, e: CallError):
    """End the RPC with the rank's status (and whose failure it is, when another instance's)."""
    if e.peer:
        context.set_trailing_metadata(((wire.FAILED_PEER, e.peer),))
    context.abort(grpc.StatusCode[e.code], e.message)


class SchedulerServicer(PrefixCacheRpcs, pb_grpc.SglangSchedulerServicer):
    """SGLang's scheduler service for the whole instance."""

    # Explicit UNIMPLEMENTED answers (the generated defaults also log a traceback per call).
    locals().update({name: unimplemented_rpc(name) for name in UNIMPLEMENTED_RPCS})

    def __init__(
        self, config: WorkerConfig, engine: Engine, controller: DPController, calls, refusals: Refusals
    ):
        self.config, self.engine, self.ctl = config, engine, controller
        self.calls = calls
        """gRPC calls served, per method (`server.CallCounter`)."""
        self.started = time.time()
        self.refusals = refusals

    # -- generation ------------------------------------------------------------------------------

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        if self.refusals.take():  # fault injection (tests): refuse as an overloaded worker would
            context.abort(grpc.StatusCode.UNAVAILABLE, Refusals.MESSAGE)
        ctl = self.ctl
        forward, prefill_rank, feed = False, None, ""
        if self.config.role == "decode":
            forward, prefill_rank, feed = wire.requested(context.invocation_metadata())
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

    def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        rid = request.request_id
        calls = [self.ctl.call(r, lambda cid: msg.Abort(cid, rid)) for r in range(self.ctl.size)]
        found = False
        for call in calls:
            with contextlib.suppress(CallError):  # a rank that is down holds nothing to abort
                found |= bool(call.result(INFO_TIMEOUT_S))
        return pb.AbortResponse(success=found, message="aborted" if found else f"no live request {rid!r}")

    # -- information -----------------------------------------------------------------------------

    def HealthCheck(self, request, context) -> pb.HealthCheckResponse:
        try:
            health = self.ctl.ask_all("health", timeout=2.0)
        except CallError as e:
            return pb.HealthCheckResponse(healthy=False, message=e.message)
        for rank, h in enumerate(health):
            if not h.healthy:
                return pb.HealthCheckResponse(healthy=False, message=f"EP rank {rank}: {h.message}")
        return pb.HealthCheckResponse(healthy=True, message=f"ok ({self.ctl.size} ranks)")

    def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        engine, mc = self.engine, self.engine.model_config
        return pb.GetModelInfoResponse(
            model_path=str(self.config.model),
            tokenizer_path=str(self.config.model),
            is_generation=True,
            served_model_name=self.config.served_model_name,
            max_context_length=engine.max_model_len,
            vocab_size=mc.vocab_size,
            model_type=mc.family,
            eos_token_ids=list(mc.eos_token_ids),
            pad_token_id=int(mc.extra.get("pad_token_id") or 0),
            bos_token_id=int(mc.bos_token_id or 0),
            max_req_input_len=engine.max_model_len - 1,
            architectures=[mc.architecture],
        )

    def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        loads = self._loads(context)
        args = struct_pb2.Struct()
        args.update(self.config.as_dict())
        # The running window routers (SMG) read for admission control, and the group's shape.
        max_seqs = self.engine.config.max_num_seqs
        args.update(
            {
                "pid": os.getpid(),
                "max_running_requests": max_seqs,
                "max_num_seqs": max_seqs,
                "ep_size": self.ctl.size,
                "dp_size": self.ctl.size,
                "rank_pids": list(self.ctl.pids),
                wire.SERVER_ARG: True,
            }
        )
        info = pb.GetServerInfoResponse(
            server_args=args,
            active_requests=sum(ld.running + ld.waiting for ld in loads),
            uptime_seconds=time.time() - self.started,
            sglang_version=VERSION,
            server_type="grpc",
            max_total_num_tokens=sum(ld.total_tokens for ld in loads),
        )
        info.start_time.FromDatetime(dt.datetime.fromtimestamp(self.started, tz=dt.UTC))
        total = TransferStats(*(sum(x) for x in zip(*(astuple(ld.transfer) for ld in loads), strict=True)))
        info.scheduler_info.update(
            {
                "grpc_calls": dict(self.calls.counts),
                # Pages kept out of use because no prefill confirmed its writes into them had stopped.
                "kv_stranded_pages": sum(ld.queues.get("stranded_pages", 0) for ld in loads),
                # Prefix cache, per DP rank (GetLoads carries each rank's cache_hit_rate).
                "prefix_cached_pages": [ld.cached_pages for ld in loads],
                "prefix_evictable_pages": [ld.evictable_pages for ld in loads],
            }
        )
        if self.config.role == "prefill":
            info.scheduler_info.update(
                {
                    "kv_transfer_bytes": total.bytes,
                    "kv_transfer_seconds": total.seconds,
                    "kv_transfer_rooms": total.rooms,
                    "kv_transfer_failed_rooms": total.failed_rooms,
                }
            )
        return info

    def GetLoads(self, request: pb.GetLoadsRequest, context) -> pb.GetLoadsResponse:
        out = pb.GetLoadsResponse(
            timestamp=dt.datetime.now(dt.UTC).isoformat(), version=VERSION, dp_rank_count=self.ctl.size
        )
        agg = out.aggregate
        for rank, ld in enumerate(self._loads(context)):
            if request.HasField("dp_rank") and request.dp_rank != rank:
                continue
            load = pb.SchedulerLoad(
                dp_rank=rank,
                num_running_reqs=ld.running,
                num_waiting_reqs=ld.waiting,
                num_total_reqs=ld.running + ld.waiting,
                num_used_tokens=ld.used_tokens,
                max_total_num_tokens=ld.total_tokens,
                token_usage=ld.used_tokens / ld.total_tokens,
                cache_hit_rate=ld.cache_hit_rate,
                max_running_requests=ld.max_num_seqs,
                memory=pb.MemoryMetrics(token_capacity=ld.total_tokens),
                disaggregation=pb.DisaggregationMetrics(
                    mode=self.config.role,
                    prefill_inflight_queue_reqs=ld.queues.get("prefill_inflight", 0),
                    decode_prealloc_queue_reqs=ld.queues.get("decode_prealloc", 0),
                    decode_transfer_queue_reqs=ld.queues.get("decode_transfer", 0),
                    kv_transfer_speed_gb_s=ld.transfer.speed_gb_s,
                    kv_transfer_latency_ms=ld.transfer.latency_ms,
                ),
                queues=pb.QueueMetrics(waiting=ld.waiting),
            )
            out.loads.append(load)
            agg.total_running_reqs += load.num_running_reqs
            agg.total_waiting_reqs += load.num_waiting_reqs
            agg.total_reqs += load.num_total_reqs
        if out.loads:
            agg.avg_token_usage = sum(ld.token_usage for ld in out.loads) / len(out.loads)
        return out

    def GetTokenizer(self, request, context) -> Iterator[common_pb2.GetTokenizerChunk]:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in TOKENIZER_FILES:
                path = Path(self.config.model) / name
                if path.is_file():
                    zf.write(path, name)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
        for i, piece in enumerate(chunks):
            yield common_pb2.GetTokenizerChunk(data=piece, sha256=digest if i == len(chunks) - 1 else "")

    def _loads(self, context) -> list[msg.RankLoad]:
        try:
            return self.ctl.ask_all("load", INFO_TIMEOUT_S)
        except CallError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"EP instance rank unreachable: {e.message}")
            raise AssertionError("unreachable") from None
