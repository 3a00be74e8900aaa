"""The SGLang scheduler gRPC service (`SglangScheduler`) served by every worker.

Implemented: Generate, Abort, HealthCheck, GetModelInfo, GetServerInfo, GetLoads, GetTokenizer.
Everything else answers UNIMPLEMENTED (the generated base class does that). A Generate with
`disaggregated_params` goes to the role's hand-off side; one without runs on this worker alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import grpc
from google.protobuf import struct_pb2
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from services.engine import InvalidRequestError
from services.worker import convert
from services.worker.config import WorkerConfig
from services.worker.engine_loop import EngineLoop, RequestStream
from services.worker.streams import abort_and_deliver, start_stream, stream_outputs

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


class DisaggSide(Protocol):
    """The role-specific half of a disaggregated Generate (prefill or decode)."""

    def generate(
        self, request: pb.GenerateRequest, params, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]: ...

    def abort(self, request_id: str) -> bool: ...

    def transfer_stats(self): ...

    def queue_depths(self) -> dict[str, int]: ...


UNIMPLEMENTED_RPCS = (
    "Embed",
    "FlushCache",
    "StartProfile",
    "StopProfile",
    "SubscribeKvEvents",
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


class SchedulerServicer(pb_grpc.SglangSchedulerServicer):
    # Explicit UNIMPLEMENTED answers (the generated defaults also log a traceback per call).
    locals().update({name: unimplemented_rpc(name) for name in UNIMPLEMENTED_RPCS})

    def __init__(self, config: WorkerConfig, loop: EngineLoop, side: DisaggSide):
        self.config = config
        self.loop = loop
        self.side = side
        self.started = time.time()

    # -- generation ------------------------------------------------------------------------------

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        engine = self.loop.engine
        prompt = list(request.tokenized.input_ids)
        try:
            params = convert.sampling_params(request.sampling_params, len(prompt), engine.max_model_len)
            engine.validate(prompt, params)
        except (InvalidRequestError, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request.HasField("disaggregated_params") and request.disaggregated_params.bootstrap_host:
            yield from self.side.generate(request, params, context)
            return

        def start(stream: RequestStream) -> str:
            rid = engine.add_request(prompt, params, request.request_id or None)
            self.loop.attach_stream(rid, stream)
            return rid

        rid, stream = start_stream(self.loop, start, context)
        yield from stream_outputs(self.loop, stream, rid, context, want_chunks=request.stream)

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        rid = request.request_id
        found = self.side.abort(rid)
        found = self.loop.run(abort_and_deliver, self.loop, rid) or found
        return pb.AbortResponse(success=found, message="aborted" if found else f"no live request {rid!r}")

    # -- information -----------------------------------------------------------------------------

    def HealthCheck(self, request, context) -> pb.HealthCheckResponse:
        if self.loop.healthy:
            return pb.HealthCheckResponse(healthy=True, message="ok")
        return pb.HealthCheckResponse(healthy=False, message=f"engine loop is down: {self.loop.error!r}")

    def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        engine = self.loop.engine
        mc = engine.model_config
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
        args = struct_pb2.Struct()
        args.update(self.config.as_dict())
        # The running window routers (SMG) read for admission control.
        args.update(
            {
                "pid": os.getpid(),
                "max_running_requests": self.loop.engine.config.max_num_seqs,
                "max_num_seqs": self.loop.engine.config.max_num_seqs,
            }
        )
        started = dt.datetime.fromtimestamp(self.started, tz=dt.UTC)
        info = pb.GetServerInfoResponse(
            server_args=args,
            active_requests=self.loop.engine.num_running + self.loop.engine.num_waiting,
            uptime_seconds=time.time() - self.started,
            sglang_version=VERSION,
            server_type="grpc",
            max_total_num_tokens=self.loop.engine.kv_stats().total_pages
            * self.loop.engine.kv_stats().page_size,
        )
        info.start_time.FromDatetime(started)
        stats = self.side.transfer_stats()
        if stats is not None:
            info.scheduler_info.update(
                {
                    "kv_transfer_bytes": stats.bytes,
                    "kv_transfer_seconds": stats.seconds,
                    "kv_transfer_rooms": stats.rooms,
                    "kv_transfer_failed_rooms": stats.failed_rooms,
                }
            )
        return info

    def GetLoads(self, request: pb.GetLoadsRequest, context) -> pb.GetLoadsResponse:
        engine = self.loop.engine
        kv = engine.kv_stats()
        total_tokens = kv.total_pages * kv.page_size
        used_tokens = kv.used_pages * kv.page_size
        running, waiting = engine.num_running, engine.num_waiting
        depths = self.side.queue_depths()
        stats = self.side.transfer_stats()
        load = pb.SchedulerLoad(
            dp_rank=0,
            num_running_reqs=running,
            num_waiting_reqs=waiting,
            num_total_reqs=running + waiting,
            num_used_tokens=used_tokens,
            max_total_num_tokens=total_tokens,
            token_usage=used_tokens / total_tokens,
            max_running_requests=engine.config.max_num_seqs,
            memory=pb.MemoryMetrics(token_capacity=total_tokens),
            disaggregation=pb.DisaggregationMetrics(
                mode=self.config.role,
                prefill_inflight_queue_reqs=depths.get("prefill_inflight", 0),
                decode_prealloc_queue_reqs=depths.get("decode_prealloc", 0),
                decode_transfer_queue_reqs=depths.get("decode_transfer", 0),
                kv_transfer_speed_gb_s=stats.speed_gb_s if stats else 0.0,
                kv_transfer_latency_ms=stats.latency_ms if stats else 0.0,
            ),
            queues=pb.QueueMetrics(waiting=waiting),
        )
        return pb.GetLoadsResponse(
            timestamp=dt.datetime.now(dt.UTC).isoformat(),
            version=VERSION,
            dp_rank_count=1,
            loads=[load],
            aggregate=pb.AggregateMetrics(
                total_running_reqs=running,
                total_waiting_reqs=waiting,
                total_reqs=running + waiting,
                avg_token_usage=used_tokens / total_tokens,
            ),
        )

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
