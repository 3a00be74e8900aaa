"""Decode side of the KV hand-off: disaggregated Generate on a decode worker.

Reserve pages for the prompt, Attach them to the room on the prefill instance named by the
request's bootstrap host and port, and once the prefill has written the prompt's KV (the Attach
returns the first token) join the decode batch and stream. Every wait has a deadline; on any
failure the reserved pages go back to the pool and the caller gets a status saying what failed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from services.engine import SamplingParams
from services.kv import KVLayout, KVRegion
from services.proto.moeserve.v1 import kv_handoff_pb2 as kvpb
from services.proto.moeserve.v1 import kv_handoff_pb2_grpc as kvpb_grpc
from services.worker import wire
from services.worker.engine_loop import EngineDead, EngineLoop, RequestStream
from services.worker.streams import start_stream, stream_outputs

POLL_S = 0.05


class DecodeSide:
    def __init__(
        self,
        loop: EngineLoop,
        layout: KVLayout,
        region: KVRegion,
        transfer_session: str,
        handoff_timeout_s: float,
        prefill_timeout_s: float,
    ):
        self.loop, self.layout, self.region = loop, layout, region
        self.transfer_session = transfer_session
        self.handoff_timeout_s, self.prefill_timeout_s = handoff_timeout_s, prefill_timeout_s
        self._stubs: dict[str, kvpb_grpc.KVHandoffStub] = {}
        self._lock = threading.Lock()
        self._waiting: dict[str, grpc.Future] = {}
        """Attach calls in flight, by request id (Abort cancels them)."""
        self._reserving = 0

    def _stub(self, addr: str) -> kvpb_grpc.KVHandoffStub:
        with self._lock:
            if addr not in self._stubs:
                self._stubs[addr] = kvpb_grpc.KVHandoffStub(grpc.insecure_channel(addr))
            return self._stubs[addr]

    def generate(
        self, request: pb.GenerateRequest, params: SamplingParams, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        dp = request.disaggregated_params
        prefill = f"{dp.bootstrap_host}:{dp.bootstrap_port}"
        prompt = list(request.tokenized.input_ids)
        request_id = request.request_id or f"room-{dp.bootstrap_room}"
        pages = self._reserve(len(prompt), context)
        try:
            res = self._attach(request_id, dp.bootstrap_room, prefill, prompt, pages, context)
        except BaseException:
            self.loop.call(self.loop.engine.free_pages, pages)
            raise
        ran = []

        def start(stream: RequestStream) -> str:
            ran.append(True)
            # Owns `pages` from here on, also when it raises.
            out = self.loop.engine.add_prefilled_request(
                prompt, res.first_token_id, pages, params, request_id
            )
            if not out.finished:
                self.loop.attach_stream(out.request_id, stream)
            stream.put(out)
            return out.request_id

        try:
            rid, stream = start_stream(self.loop, start, context)
        except BaseException:
            if not ran and self.loop.healthy:
                self.loop.call(self.loop.engine.free_pages, pages)  # `start` was cancelled unrun
            raise
        yield from stream_outputs(self.loop, stream, rid, context, request.stream, res.cached_tokens)

    def _reserve(self, num_tokens: int, context: grpc.ServicerContext) -> list[int]:
        """Pages for the prompt, waiting up to the hand-off timeout for the pool to have room."""
        deadline = time.monotonic() + self.handoff_timeout_s
        with self._lock:
            self._reserving += 1
        try:
            while True:
                try:
                    pages = self.loop.run(self.loop.engine.reserve_pages, num_tokens)
                except EngineDead as e:
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"decode engine is down: {e}")
                if pages is not None:
                    return pages
                if not context.is_active():
                    context.abort(
                        grpc.StatusCode.CANCELLED, "the caller went away while waiting for KV pages"
                    )
                if time.monotonic() > deadline:
                    context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"decode KV pool has no room for a {num_tokens}-token prompt after "
                        f"{self.handoff_timeout_s:.0f}s; retry later or add decode capacity",
                    )
                time.sleep(POLL_S)
        finally:
            with self._lock:
                self._reserving -= 1

    def _attach(
        self,
        request_id: str,
        room: int,
        prefill: str,
        prompt: list[int],
        pages: list[int],
        context: grpc.ServicerContext,
    ) -> kvpb.AttachResponse:
        stub = self._stub(prefill)
        call = stub.Attach.future(
            kvpb.AttachRequest(
                room=room,
                request_id=request_id,
                layout=wire.layout_to_proto(self.layout),
                transfer_session=self.transfer_session,
                kv_base_address=self.region.base,
                layer_stride_bytes=self.region.layer_stride,
                page_ids=pages,
                num_prompt_tokens=len(prompt),
            ),
            timeout=self.prefill_timeout_s,
        )
        with self._lock:
            self._waiting[request_id] = call
        try:
            while not call.done():
                time.sleep(POLL_S)
                if not context.is_active():
                    call.cancel()
                    self._release(stub, room, "the client went away")
                    context.abort(grpc.StatusCode.CANCELLED, "request cancelled while waiting for KV")
            if call.cancelled():
                self._release(stub, room, "aborted")
                context.abort(grpc.StatusCode.ABORTED, f"request {request_id} aborted while waiting for KV")
            try:
                return call.result()
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._release(stub, room, "decode gave up waiting")
                context.abort(
                    e.code(), f"KV hand-off from prefill {prefill} (room {room}) failed: {e.details()}"
                )
        finally:
            with self._lock:
                self._waiting.pop(request_id, None)

    @staticmethod
    def _release(stub: kvpb_grpc.KVHandoffStub, room: int, reason: str) -> None:
        with contextlib.suppress(grpc.RpcError):  # prefill gone too: nothing left to release there
            stub.Release(kvpb.ReleaseRequest(room=room, reason=reason), timeout=15.0)

    # -- DisaggSide ------------------------------------------------------------------------------

    def abort(self, request_id: str) -> bool:
        with self._lock:
            call = self._waiting.get(request_id)
        return call.cancel() if call is not None else False

    def transfer_stats(self) -> None:
        return None  # decode receives; the prefill side does (and counts) the writes

    def queue_depths(self) -> dict[str, int]:
        with self._lock:
            return {"decode_prealloc": self._reserving, "decode_transfer": len(self._waiting)}
