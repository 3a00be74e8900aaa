"""Prefill side of the KV hand-off: the KVHandoff service and disaggregated Generate on a prefill.

For a room, prefill waits until both the Generate and the decode's Attach have arrived, then
queues the prompt with a `RoomSender` listening on it. After every layer of every prompt chunk
the sender queues a write of that layer's new KV into the decode pages; a transfer thread does
the writes in order, then answers the Attach with the first token and lets the engine free the
prefill pages. A failed write, an abort or a release ends the room with an error status.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from services.engine import RequestOutput, SamplingParams
from services.kv import KVLayout, KVRegion, LayoutMismatch, TransferEngine, TransferError, copy_descriptors
from services.proto.moeserve.v1 import kv_handoff_pb2 as kvpb
from services.proto.moeserve.v1 import kv_handoff_pb2_grpc as kvpb_grpc
from services.worker import convert, wire
from services.worker.engine_loop import EngineDead, EngineLoop
from services.worker.rooms import Room, RoomTable
from services.worker.streams import abort_and_deliver

log = logging.getLogger(__name__)
POLL_S = 0.1


@dataclass
class TransferStats:
    """Cumulative KV hand-off figures of this prefill worker (sender thread writes, RPCs read)."""

    bytes: int = 0
    seconds: float = 0.0
    """Time spent inside transfer-engine writes."""
    rooms: int = 0
    failed_rooms: int = 0

    @property
    def speed_gb_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def latency_ms(self) -> float:
        return 1000 * self.seconds / self.rooms if self.rooms else 0.0


class RoomSender:
    """KVListener for one room: turns finished layers into queued page writes (engine thread)."""

    def __init__(self, side: PrefillSide, room: Room):
        self.side, self.room = side, room
        attach = room.attach
        assert attach is not None
        self.dst = KVRegion(
            attach.kv_base_address, attach.layer_stride_bytes, side.region.entry_bytes, side.region.page_size
        )
        self.dst_pages = list(attach.page_ids)
        self.bytes = 0
        self.deferred: list[tuple[list[int], list[int], list[int]]] | None = (
            [] if side.push == "complete" else None
        )

    def on_layer(self, layer: int, start: int, end: int, pages: list[int]) -> None:
        try:
            descs = copy_descriptors(layer, start, end, self.side.region, pages, self.dst, self.dst_pages)
        except Exception as e:  # a bad destination must fail this room, never the engine loop
            self.room.fail(grpc.StatusCode.INTERNAL, f"room {self.room.room_id}: bad KV destination: {e!r}")
            return
        if self.deferred is not None:
            self.deferred.append(descs)
        else:
            self.side.jobs.put((self._write, descs))

    def on_finish(self, output: RequestOutput) -> None:
        if self.deferred and output.finish_reason != "abort":
            merged = tuple([x for d in self.deferred for x in d[i]] for i in range(3))
            self.side.jobs.put((self._write, merged))
        self.side.jobs.put((self._finish, output))

    def _write(self, descs: tuple[list[int], list[int], list[int]]) -> None:
        if self.room.done:
            return  # failed or released: skip the remaining layers
        try:
            start = time.perf_counter()
            self.side.transfer.write(self.room.attach.transfer_session, *descs)
            self.side.stats.seconds += time.perf_counter() - start
            self.side.stats.bytes += sum(descs[2])
            self.bytes += sum(descs[2])
        except TransferError as e:
            self.room.fail(grpc.StatusCode.UNAVAILABLE, f"room {self.room.room_id}: {e}")

    def _finish(self, output: RequestOutput) -> None:
        self.side.stats.rooms += 1
        if output.finish_reason == "abort" or self.room.error is not None:
            self.side.stats.failed_rooms += 1
        if output.finish_reason == "abort":
            self.room.fail(grpc.StatusCode.ABORTED, f"room {self.room.room_id} was aborted on prefill")
        else:
            self.room.succeed(
                kvpb.AttachResponse(
                    first_token_id=output.output_token_ids[0],
                    prompt_tokens=len(output.prompt_token_ids),
                    cached_tokens=0,
                    transferred_bytes=self.bytes,
                )
            )
        # Every write for this request is done (jobs run in order): its pages may be reused now.
        self.side.loop.call(self.side.loop.engine.release, output.request_id)


class PrefillSide(kvpb_grpc.KVHandoffServicer):
    def __init__(
        self,
        loop: EngineLoop,
        layout: KVLayout,
        region: KVRegion,
        transfer: TransferEngine,
        handoff_timeout_s: float,
        push: str = "layerwise",
    ):
        self.loop, self.layout, self.region, self.transfer = loop, layout, region, transfer
        self.handoff_timeout_s = handoff_timeout_s
        self.push = push
        """layerwise: write each layer's KV as soon as it is computed (overlaps transfer with
        compute); complete: write everything once the prompt is done (for hosts where the copy
        itself needs the CPU that prefill is using, e.g. TCP on a small machine)."""
        self.rooms = RoomTable()
        self.stats = TransferStats()
        self.jobs: queue.SimpleQueue[tuple[Callable, object]] = queue.SimpleQueue()
        threading.Thread(target=self._transfer_loop, name="kv-sender", daemon=True).start()

    def _transfer_loop(self) -> None:
        held: tuple[Callable, object] | None = None
        while True:
            fn, arg = held or self.jobs.get()
            held = None
            if getattr(fn, "__func__", None) is RoomSender._write:
                # Writes of the same room queued behind this one (the sender fell behind the
                # compute) go out as one batch: fewer, larger transfer calls.
                srcs, dsts, lens = (list(x) for x in arg)  # type: ignore[union-attr]
                while True:
                    try:
                        nxt = self.jobs.get_nowait()
                    except queue.Empty:
                        break
                    if nxt[0] != fn:
                        held = nxt
                        break
                    for acc, part in zip((srcs, dsts, lens), nxt[1], strict=True):  # type: ignore[arg-type]
                        acc.extend(part)
                arg = (srcs, dsts, lens)
            try:
                fn(arg)
            except Exception:  # one bad room must not stop the sender for all others
                log.exception("KV sender job failed")

    # -- Generate on a prefill worker ------------------------------------------------------------

    def generate(
        self, request: pb.GenerateRequest, params: SamplingParams, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        room = self.rooms.enter(request.disaggregated_params.bootstrap_room)
        try:
            with room.changed:
                if room.request_id is not None:
                    context.abort(grpc.StatusCode.ALREADY_EXISTS, f"room {room.room_id} is already in use")
                room.request_id = request.request_id or f"room-{room.room_id}"
                room.prompt = list(request.tokenized.input_ids)
                room.changed.notify_all()
            if not self._wait(room, lambda: room.attach is not None, self.handoff_timeout_s, context):
                room.fail(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no decode attached to room {room.room_id} within {self.handoff_timeout_s:.0f}s",
                )
            if not room.done:
                self._start(room, params)
            self._wait(room, lambda: False, None, context)
            if room.error is not None:
                context.abort(room.error.code, room.error.message)
            res = room.result
            out = RequestOutput(room.request_id, room.prompt, [res.first_token_id], "length")
            yield convert.complete(out, cached_tokens=res.cached_tokens)
        finally:
            self.rooms.leave(room)

    def _start(self, room: Room, params: SamplingParams) -> None:
        attach = room.attach
        if attach.num_prompt_tokens != len(room.prompt):
            room.fail(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"room {room.room_id}: decode attached pages for {attach.num_prompt_tokens} tokens, "
                f"the prompt has {len(room.prompt)}",
            )
            return
        needed = -(-len(room.prompt) // self.region.page_size)
        if len(attach.page_ids) < needed:
            room.fail(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"room {room.room_id}: decode attached {len(attach.page_ids)} pages, a "
                f"{len(room.prompt)}-token prompt needs {needed}",
            )
            return
        # Prefill samples exactly the first token; decode samples the rest with the same params.
        first = SamplingParams(**{**params.__dict__, "max_tokens": 1})
        sender = RoomSender(self, room)

        def start() -> None:
            if room.done:  # aborted or released while this command waited in the queue
                return
            self.loop.engine.add_request(room.prompt, first, room.request_id, listener=sender)
            room.in_engine = True

        try:
            self.loop.run(start)
        except EngineDead as e:
            room.fail(grpc.StatusCode.UNAVAILABLE, f"room {room.room_id}: prefill engine is down: {e}")
        except Exception as e:
            room.fail(grpc.StatusCode.INVALID_ARGUMENT, f"room {room.room_id}: {e}")

    def _wait(self, room: Room, predicate, timeout: float | None, context) -> bool:
        """Wait for `predicate` (or the room's end); the caller going away aborts the room."""
        waited = 0.0
        while timeout is None or waited < timeout:
            if room.wait_for(predicate, POLL_S):
                return True
            waited += POLL_S
            if not context.is_active():
                self._abort_room(room, "the caller went away")
                return True
            if not self.loop.healthy:
                room.fail(grpc.StatusCode.UNAVAILABLE, f"room {room.room_id}: prefill engine is down")
                return True
        return False

    def _abort_room(self, room: Room, why: str) -> None:
        room.fail(grpc.StatusCode.ABORTED, f"room {room.room_id} aborted: {why}")
        if room.request_id:
            # Queued after any pending start (commands run in order), so it cannot miss it.
            self.loop.call(abort_and_deliver, self.loop, room.request_id)

    def _writes_settled(self, room: Room) -> bool:
        """Wait until the sender has passed every write queued so far (they skip ended rooms).

        Decode frees its pages as soon as it hears the room ended, so nothing may land after.
        """
        if not room.in_engine:
            return True
        barrier = threading.Event()
        self.jobs.put((lambda _: barrier.set(), None))
        return barrier.wait(timeout=10.0)

    # -- KVHandoff service -----------------------------------------------------------------------

    def Attach(self, request: kvpb.AttachRequest, context: grpc.ServicerContext) -> kvpb.AttachResponse:
        room = self.rooms.enter(request.room)
        try:
            try:
                self.layout.check_compatible(wire.layout_from_proto(request.layout))
            except LayoutMismatch as e:
                room.fail(grpc.StatusCode.FAILED_PRECONDITION, str(e))
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            with room.changed:
                if room.attach is not None:
                    context.abort(grpc.StatusCode.ALREADY_EXISTS, f"room {room.room_id} already has a decode")
                room.attach = request
                room.changed.notify_all()
            if not self._wait(room, lambda: room.prompt is not None, self.handoff_timeout_s, context):
                room.fail(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"prefill received no Generate for room {room.room_id} "
                    f"within {self.handoff_timeout_s:.0f}s",
                )
            self._wait(room, lambda: False, None, context)
            if room.error is not None:
                self._writes_settled(room)
                context.abort(room.error.code, room.error.message)
            return room.result
        finally:
            self.rooms.leave(room)

    def Release(self, request: kvpb.ReleaseRequest, context) -> kvpb.ReleaseResponse:
        room = self.rooms.get(request.room)
        if room is None or room.done:
            return kvpb.ReleaseResponse(released=False)
        self._abort_room(room, f"released by decode ({request.reason or 'no reason given'})")
        if not self._writes_settled(room):
            context.abort(
                grpc.StatusCode.UNAVAILABLE, f"room {room.room_id}: KV writes did not settle in 10 s"
            )
        return kvpb.ReleaseResponse(released=True)

    # -- DisaggSide ------------------------------------------------------------------------------

    def abort(self, request_id: str) -> bool:
        room = self.rooms.by_request(request_id)
        if room is None or room.done:
            return False
        self._abort_room(room, "Abort RPC")
        return True

    def transfer_stats(self) -> TransferStats:
        return self.stats

    def queue_depths(self) -> dict[str, int]:
        return {"prefill_inflight": len(self.rooms)}
