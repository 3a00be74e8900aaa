"""The information RPCs of SGLang's scheduler service on rank 0: GetModelInfo, GetServerInfo, GetLoads
and GetTokenizer, for the whole instance (every DP rank's load, summed or listed per rank)."""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import io
import json
import os
import time
import zipfile
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path
from typing import Protocol

import grpc
from google.protobuf import struct_pb2
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import common_pb2

from services.common import wire
from services.common.calls import CallError
from services.engine import Engine
from services.kv.sender import TransferStats
from services.worker import messages as msg
from services.worker.config import WorkerConfig
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
REMOTE_CODE_FILES = ("tiktoken.model", "*.tiktoken", "tokenization_*.py", "tokenizer.model")
"""A tokenizer that is code shipped with the model (Kimi K2's): its class and its vocabulary."""
CHUNK_BYTES = 1 << 20
INFO_TIMEOUT_S = 5.0


class CallCounts(Protocol):
    """gRPC calls served, per method (`server.CallCounter`)."""

    counts: collections.Counter[str]


def tokenizer_files(model_dir: Path) -> list[str]:
    """What a router needs to tokenize for this model: the tokenizer, its chat template and
    generation defaults, and for a tokenizer that is code, that code (the modules tokenizer_config's
    `auto_map` names) and its vocabulary files."""
    names = [n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
    names += sorted({p.name for pattern in REMOTE_CODE_FILES for p in model_dir.glob(pattern) if p.is_file()})
    try:
        auto_map = json.loads((model_dir / "tokenizer_config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError):
        auto_map = {}
    classes = auto_map.get("AutoTokenizer") or []
    for ref in classes if isinstance(classes, list) else [classes]:
        module = f"{ref.rsplit('.', 1)[0]}.py" if isinstance(ref, str) and "--" not in ref else None
        if module and (model_dir / module).is_file() and module not in names:
            names.append(module)
    return names


class InstanceInfo:
    """Answers the information RPCs from the config, the engine and every rank's load."""

    def __init__(
        self, config: WorkerConfig, engine: Engine, controller: DPController, calls: CallCounts
    ) -> None:
        self.config, self.engine, self.ctl = config, engine, controller
        self.calls = calls
        """gRPC calls served, per method (`server.CallCounter`)."""
        self.started = time.time()

    def model_info(self) -> pb.GetModelInfoResponse:
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

    def server_info(self, context: grpc.ServicerContext) -> pb.GetServerInfoResponse:
        loads = self._loads(context)
        args = struct_pb2.Struct()
        args.update(self.config.as_dict())
        # The running window routers (SMG, moeserve) read for admission control, for the whole
        # worker as SGLang's servicer reports it (each rank runs max_num_seqs), and the group's shape.
        max_seqs = self.engine.config.max_num_seqs
        args.update(
            {
                "pid": os.getpid(),
                "max_running_requests": max_seqs * self.ctl.size,
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

    def loads(self, request: pb.GetLoadsRequest, context: grpc.ServicerContext) -> pb.GetLoadsResponse:
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

    def tokenizer(self) -> Iterator[common_pb2.GetTokenizerChunk]:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in tokenizer_files(Path(self.config.model)):
                zf.write(Path(self.config.model) / name, name)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
        for i, piece in enumerate(chunks):
            yield common_pb2.GetTokenizerChunk(data=piece, sha256=digest if i == len(chunks) - 1 else "")

    def _loads(self, context: grpc.ServicerContext) -> list[msg.RankLoad]:
        try:
            return self.ctl.ask_all("load", INFO_TIMEOUT_S)
        except CallError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"EP instance rank unreachable: {e.message}")
            raise AssertionError("unreachable") from None
