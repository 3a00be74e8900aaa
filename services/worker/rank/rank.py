"""One DP rank of an instance: its engine loop, transfer engine and role half of the KV hand-off,
and the calls its DP controller hands it (in process on rank 0, over ZeroMQ elsewhere).

Each call runs on a thread of the rank's pool, like a gRPC handler: it replies values, then
`End`, or one `Failure` with a canonical status name. `Cancel` wakes whatever the call waits on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from services.common.calls import CallError
from services.engine import Engine, InvalidRequestError, RequestOutput, SamplingParams
from services.engine.loop import EngineDead, EngineLoop, RequestStream
from services.ep import ExpertPlacement
from services.kv import AttachResult, AttachSpec, KVLayout, KVRegion, TransferEngine
from services.kv.decode import AttachClient, DecodeHandoff, Forward
from services.kv.prefill import Forwarded, PrefillHandoff
from services.kv.sender import KVSender, TransferStats
from services.worker import messages as msg
from services.worker import proto_convert
from services.worker.config import WorkerConfig
from services.worker.faults import FailedWrites
from services.worker.rank.kv_events import KvEventLog
from services.worker.rank.rank_call import RankCall
from services.worker.rank.streams import RequestLog, logged, stream_outputs

MAX_CALLS = 1024
"""Generate and Attach calls one rank serves at once (each holds a thread while it runs)."""
QUICK_CALLS = 16
"""Threads for short calls (Release, Abort, questions), apart, so long calls cannot starve them."""


class Rank:
    """Engine, loop, transfer engine and role half of one DP rank; serves the controller's calls."""

    def __init__(self, config: WorkerConfig, engine: Engine, attach_client: AttachClient):
        self.config, self.engine = config, engine
        self.loop = EngineLoop(engine)
        mc = engine.model_config
        self.layout = KVLayout(
            mc.architecture,
            mc.num_layers,
            tuple(mc.kv_entry_shape),
            engine.config.dtype,
            engine.config.page_size,
        )
        storage = engine.kv.storage
        self.region = KVRegion(
            storage.data_ptr(), storage[0].nbytes, self.layout.entry_bytes, self.layout.page_size
        )
        self.transfer = TransferEngine(config.advertised, config.transfer_protocol, config.transfer_device)
        self.transfer.register(storage.data_ptr(), storage.nbytes)
        self.sender: KVSender | None = None
        if config.role == "prefill":
            self.sender = KVSender(self.transfer, FailedWrites().check, engine.runner.device)
            self.prefill: PrefillHandoff | None = PrefillHandoff(
                self.loop, self.layout, self.region, self.sender, config.handoff_timeout_s, config.kv_push
            )
            self.decode: DecodeHandoff | None = None
        else:
            self.prefill = None
            self.decode = DecodeHandoff(
                self.loop,
                self.layout,
                self.region,
                self.transfer.session_id,
                attach_client,
                config.handoff_timeout_s,
                config.prefill_timeout_s,
            )
        self.kv_events = KvEventLog()
        """The prefix cache's stored/removed blocks, for SubscribeKvEvents."""
        if engine.prefix_cache is not None:
            engine.prefix_cache.events = self.kv_events.add
        self.reply: Callable[[msg.Event], None] = lambda event: None
        """Where events go (set by the instance: the controller, directly or over ZeroMQ)."""
        self._calls: dict[int, RankCall] = {}
        self._pool = ThreadPoolExecutor(max_workers=MAX_CALLS, thread_name_prefix="rank-call")
        self._quick = ThreadPoolExecutor(max_workers=QUICK_CALLS, thread_name_prefix="rank-quick")

    def start(self) -> None:
        self.loop.start()

    def handle(self, message: msg.Command | msg.Cancel) -> None:
        """Take one message from the controller (its receive thread, or rank 0's caller)."""
        if isinstance(message, msg.Cancel):
            call = self._calls.get(message.call_id)
            if call is not None:
                call.cancel()
            return
        call = self._calls[message.call_id] = RankCall()
        long = isinstance(message, (msg.Generate, msg.Attach))
        (self._pool if long else self._quick).submit(self._serve, message, call)

    def _serve(self, command: msg.Command, call: RankCall) -> None:
        cid = command.call_id
        try:
            for value in self._answer(command, call):
                self.reply(msg.Reply(cid, value))
            self.reply(msg.End(cid))
        except CallError as e:
            self.reply(msg.Failure(cid, e))
        except InvalidRequestError as e:
            self.reply(msg.Failure(cid, CallError("INVALID_ARGUMENT", str(e))))
        except EngineDead as e:
            self.reply(msg.Failure(cid, CallError("UNAVAILABLE", f"worker engine is down: {e}")))
        except Exception as e:  # a bug in one call must not take the rank down
            self.reply(msg.Failure(cid, CallError("INTERNAL", f"{type(e).__name__}: {e}")))
        finally:
            self._calls.pop(cid, None)

    def _answer(self, command: msg.Command, call: RankCall) -> Iterator[Any]:
        if isinstance(command, msg.Generate):
            request = pb.GenerateRequest.FromString(command.request)
            forward = (
                Forward(command.request, command.prefill_rank, command.token_feed)
                if command.forward
                else None
            )
            yield from logged(request.request_id, self.config.role, self._generate(request, call, forward))
        elif isinstance(command, msg.Attach):
            assert self.prefill is not None and command.spec is not None
            spec = command.spec
            yield (
                self._forwarded(spec, call, command.call_id)
                if spec.forwarded
                else self.prefill.attach(spec, call)
            )
        elif isinstance(command, msg.Release):
            assert self.prefill is not None
            yield self.prefill.release(command.room, command.reason)
        elif isinstance(command, msg.Abort):
            yield self._abort(command.request_id)
        elif isinstance(command, msg.Ask):
            yield self._ask(command.what)
        elif isinstance(command, msg.KvEvents):
            yield self.kv_events.since(command.since)
        elif isinstance(command, msg.SetPlacement):
            yield self.loop.run(self._set_placement, command.phy2log)
        elif isinstance(command, msg.FlushCache):
            cache = self.engine.prefix_cache
            yield self.loop.run(cache.clear) if cache is not None else 0
        else:
            raise TypeError(f"unknown command {type(command).__name__}")

    # -- calls -----------------------------------------------------------------------------------

    def _checked(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        """The request's prompt and engine parameters; INVALID_ARGUMENT if the engine cannot run it."""
        prompt = list(request.tokenized.input_ids)
        try:
            params = proto_convert.request_params(request, self.engine.max_model_len)
            self.engine.validate(prompt, params)
        except ValueError as e:  # bad prompt or sampling parameters
            raise CallError("INVALID_ARGUMENT", str(e)) from None
        return prompt, params

    def _forwarded(self, spec: AttachSpec, call: RankCall, call_id: int) -> AttachResult:
        """Decode-first: the Attach brought the request; serve it as this rank's own Generate. For a
        router's feed, its first token goes back on the call as sampled, ahead of the AttachResult."""
        assert self.prefill is not None
        request = pb.GenerateRequest.FromString(spec.forwarded)
        prompt, params = self._checked(request)
        rid = request.request_id or f"room-{spec.room}"

        def first(out: RequestOutput) -> None:  # engine thread
            self.reply(msg.Reply(call_id, msg.FirstToken.of(spec.room, rid, out)))

        on_first = first if spec.token_feed else None
        with RequestLog(request.request_id, "prefill") as log:
            res = self.prefill.attach(spec, call, Forwarded(rid, prompt, params, on_first))
        log.done("length", len(prompt), 1, res.cached_tokens)  # as its Generate would have ended
        return res

    def _generate(
        self, request: pb.GenerateRequest, call: RankCall, forward: Forward | None
    ) -> Iterator[bytes]:
        engine = self.engine
        prompt, params = self._checked(request)
        dp = request.disaggregated_params if request.HasField("disaggregated_params") else None
        if dp is not None and dp.bootstrap_host:
            request_id = request.request_id or f"room-{dp.bootstrap_room}"
            if self.prefill is not None:
                res = self.prefill.generate(dp.bootstrap_room, request_id, prompt, params, call)
                yield proto_convert.prefill_complete(request_id, prompt, res).SerializeToString()
                return
            decode = self.decode
            assert decode is not None
            prefill = f"{dp.bootstrap_host}:{dp.bootstrap_port}"
            stream = RequestStream()
            try:
                source = self.loop.run(
                    decode.start, request_id, prompt, params, dp.bootstrap_room, prefill, stream, forward
                )
            except InvalidRequestError as e:  # the request id is in use
                raise CallError("ALREADY_EXISTS", str(e)) from None
            yield from stream_outputs(
                self.loop,
                stream,
                request_id,
                call,
                request.stream,
                decode.abort,
                lambda: source.result.cached_tokens if source.result else 0,
                last_in_complete=forward is not None,
            )
            return
        stream = RequestStream()

        def start() -> str:
            rid = engine.add_request(prompt, params, request.request_id or None)
            self.loop.attach_stream(rid, stream)
            return rid

        try:
            rid = self.loop.run(start)
        except InvalidRequestError as e:
            raise CallError("ALREADY_EXISTS", str(e)) from None
        yield from stream_outputs(self.loop, stream, rid, call, request.stream, self.loop.abort)

    def _set_placement(self, phy2log: tuple[tuple[int, ...], ...]) -> bool:
        """Engine thread: make the placement pending (the group switches when all ranks have it)."""
        par = self.engine.model.parallel
        if par.pending is not None:
            return False
        now = par.placement
        par.pending = ExpertPlacement(now.num_experts, now.ep_size, torch.tensor(phy2log), now.num_nodes)
        return True

    def _abort(self, request_id: str) -> bool:
        if self.prefill is not None and self.prefill.abort(request_id):
            return True
        abort = self.decode.abort if self.decode is not None else self.loop.abort
        return bool(self.loop.run(abort, request_id))

    def _ask(self, what: msg.Query) -> Any:
        engine = self.engine
        if what == "health":
            if self.loop.healthy:
                return msg.RankHealth(True, "ok")
            return msg.RankHealth(False, f"engine loop is down: {self.loop.error!r}")
        if what == "expert_load":
            counts, tokens, steps = self.loop.run(engine.expert_load)
            return msg.ExpertLoad(counts.tolist(), tokens, steps)
        if what == "placement":
            return engine.model.parallel.version
        if what == "metrics":
            return msg.RankMetrics(self._load(), self.loop.run(engine.stats.snapshot))
        return self._load()

    def _load(self) -> msg.RankLoad:
        engine = self.engine
        kv = engine.kv_stats()
        half = self.prefill or self.decode
        return msg.RankLoad(
            running=engine.num_running,
            waiting=engine.num_waiting,
            used_tokens=kv.used_pages * kv.page_size,
            total_tokens=kv.total_pages * kv.page_size,
            max_num_seqs=engine.config.max_num_seqs,
            queues=half.queue_depths() if half is not None else {},
            # A copy: the sender thread keeps adding to its own.
            transfer=dataclasses.replace(self.sender.stats) if self.sender is not None else TransferStats(),
            cached_pages=kv.cached_pages,
            evictable_pages=kv.evictable_pages,
            prompt_tokens=engine.scheduler.prompt_tokens,
            cached_tokens=engine.scheduler.cached_tokens,
        )
