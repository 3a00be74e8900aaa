"""Prefill side of the KV hand-off on one rank: rooms meet, the prompt runs, its KV goes out.

For a room, prefill waits until both the Generate and the decode's Attach have arrived (or takes
the request from the Attach, when decode forwarded it: decode-first), then queues the prompt
with a `RoomListener` on it. After every layer of every prompt chunk the listener queues a
`Write` of that layer's new KV into the decode pages; the sender does the writes in order, then
the `Finish` answers the calls with the first token and lets the engine free the prefill pages
(prefill requests hold their pages until sent). A failed write, an abort or a release ends the
room with an error; the error is answered only once writes have settled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from services.common.calls import Caller, CallError
from services.engine import InvalidRequestError, RequestOutput, SamplingParams
from services.engine.loop import EngineDead, EngineLoop
from services.kv.layout import KVLayout, LayoutMismatch
from services.kv.pages import KVRegion, copy_descriptors
from services.kv.rooms import AttachResult, AttachSpec, Room, RoomTable
from services.kv.sender import Finish, KVSender, Write
from services.models.device import DeviceMark

log = logging.getLogger(__name__)

SETTLE_S = 10.0
"""Longest a room's error or release waits for the writes queued before it."""


@dataclass(frozen=True)
class Forwarded:
    """A request its decode forwarded in the Attach (decode-first): what a Generate would carry."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    on_first: Callable[[RequestOutput], None] | None = None
    """Told the prompt's output (its first token) as soon as it is sampled, before the KV is sent,
    unless that token ends the request."""


class RoomListener:
    """KVListener for one room: turns finished layers into queued page writes (engine thread)."""

    def __init__(
        self,
        side: PrefillHandoff,
        room: Room,
        spec: AttachSpec,
        on_first: Callable[[RequestOutput], None] | None = None,
    ):
        self.side, self.room, self.on_first = side, room, on_first
        self.dst = KVRegion(spec.kv_base, spec.layer_stride, side.region.entry_bytes, side.region.page_size)
        self.dst_pages = list(spec.page_ids)
        self.deferred: list[tuple[list[int], list[int], list[int]]] | None = (
            [] if side.push == "complete" else None
        )
        self.written: DeviceMark | None = None
        """The mark of the last layer reported: its KV and everything before it are on the device."""

    def on_layer(self, layer: int, start: int, end: int, pages: list[int], written: DeviceMark) -> None:
        try:
            descs = copy_descriptors(layer, start, end, self.side.region, pages, self.dst, self.dst_pages)
        except Exception as e:  # a bad destination must fail this room, never the engine loop
            self.room.fail("INTERNAL", f"room {self.room.room_id}: bad KV destination: {e!r}")
            return
        self.written = written  # the latest: the device runs a thread's work in order
        if self.deferred is not None:
            self.deferred.append(descs)
        else:
            self.side.sender.put(Write(self.room, descs, written))

    def on_finish(self, output: RequestOutput) -> None:
        # Not a token that ends the request (EOS, a stop token): decode's answer says it ends there.
        if self.on_first is not None and output.finish_reason == "length":
            try:
                self.on_first(output)
            except Exception:  # never into the engine's step; decode still delivers the token
                log.exception("room %d: could not send the first token ahead", self.room.room_id)
        if self.deferred and output.finish_reason != "abort":
            merged = tuple([x for d in self.deferred for x in d[i]] for i in range(3))
            self.side.sender.put(Write(self.room, merged, self.written))  # type: ignore[arg-type]
        self.side.sender.put(Finish(self.room, lambda: self._finish(output)))

    def _finish(self, output: RequestOutput) -> None:
        room = self.room
        if output.finish_reason == "abort":
            room.fail("ABORTED", f"room {room.room_id} was aborted on prefill")
        else:
            room.succeed(
                AttachResult(
                    first_token_id=output.output_token_ids[0],
                    prompt_tokens=len(output.prompt_token_ids),
                    cached_tokens=output.cached_tokens,
                    transferred_bytes=self.side.sender.sent.get(room.room_id, 0),
                    first_logprob=output.output_logprobs[0] if output.output_logprobs else None,
                )
            )
        # Every write for this request is done (jobs run in order): its pages may be reused now.
        self.side.loop.call(self.side.loop.engine.handoff.release, output.request_id)


class PrefillHandoff:
    """The rooms of one prefill rank and what each side of a room waits for."""

    def __init__(
        self,
        loop: EngineLoop,
        layout: KVLayout,
        region: KVRegion,
        sender: KVSender,
        handoff_timeout_s: float,
        push: str = "layerwise",
    ):
        self.loop, self.layout, self.region, self.sender = loop, layout, region, sender
        self.handoff_timeout_s = handoff_timeout_s
        self.push = push
        """layerwise: write each layer's KV as soon as it is computed (overlaps transfer with
        compute); complete: write everything once the prompt is done (for hosts where the copy
        itself needs the CPU that prefill is using, e.g. TCP on a small machine)."""
        self.rooms = RoomTable()
        loop.add_stop_callback(self._engine_stopped)

    def _engine_stopped(self, error: BaseException) -> None:
        for room in self.rooms.all():
            room.fail("UNAVAILABLE", f"room {room.room_id}: prefill engine is down: {error}")
        # Runs before the instance fails its calls (registered first): decode hears of it only
        # once no write can land any more.
        self.sender.settle(SETTLE_S)

    def generate(
        self, room_id: int, request_id: str, prompt: list[int], params: SamplingParams, caller: Caller
    ) -> AttachResult:
        """The prefill half of a disaggregated Generate: returns once the KV is in the decode pages."""
        room = self.rooms.enter(room_id)
        try:
            with room.changed:
                if room.request_id is not None:
                    raise CallError("ALREADY_EXISTS", f"room {room_id} is already in use")
                room.request_id, room.prompt = request_id, prompt
                room.changed.notify_all()
            if not self._wait(room, lambda: room.attach is not None, self.handoff_timeout_s, caller):
                room.fail(
                    "DEADLINE_EXCEEDED",
                    f"no decode attached to room {room_id} within {self.handoff_timeout_s:.0f}s",
                )
            if not room.done:
                self._start(room, params)
            self._wait(room, lambda: False, None, caller)
            if room.error is not None:
                raise room.error
            assert room.result is not None
            return room.result
        finally:
            self.rooms.leave(room)

    def attach(self, spec: AttachSpec, caller: Caller, forwarded: Forwarded | None = None) -> AttachResult:
        """The decode's Attach: returns once the prompt KV is in `spec`'s pages. With `forwarded`
        (decode-first) the request comes with it, and no Generate is waited for."""
        room = self.rooms.enter(spec.room)
        try:
            try:
                self.layout.check_compatible(spec.layout)
            except LayoutMismatch as e:
                room.fail("FAILED_PRECONDITION", str(e))
                raise CallError("FAILED_PRECONDITION", str(e)) from None
            with room.changed:
                if room.attach is not None or (forwarded is not None and room.request_id is not None):
                    raise CallError("ALREADY_EXISTS", f"room {spec.room} already has a decode")
                room.attach = spec
                if forwarded is not None:
                    room.request_id, room.prompt = forwarded.request_id, forwarded.prompt
                room.changed.notify_all()
            if forwarded is not None:
                self._start(room, forwarded.params, forwarded.on_first)
            elif not self._wait(room, lambda: room.prompt is not None, self.handoff_timeout_s, caller):
                room.fail(
                    "DEADLINE_EXCEEDED",
                    f"prefill received no Generate for room {spec.room} within {self.handoff_timeout_s:.0f}s",
                )
            self._wait(room, lambda: False, None, caller)
            if room.error is not None:
                self._settle(room)  # decode frees its pages when it hears this: nothing may land after
                raise room.error
            assert room.result is not None
            return room.result
        finally:
            self.rooms.leave(room)

    def release(self, room_id: int, reason: str) -> bool:
        """Decode gives up on a room: stop it and return once no write can land any more."""
        room = self.rooms.get(room_id)
        if room is None:
            return False  # never seen, or every call on it has finished (and settled)
        live = not room.done
        if live:
            self._abort_room(room, f"released by decode ({reason or 'no reason given'})")
        if not self._settle(room):  # an ended room's writes may still be draining too
            raise CallError(
                "DEADLINE_EXCEEDED", f"room {room_id}: KV writes did not settle in {SETTLE_S:.0f} s"
            )
        return live

    def abort(self, request_id: str) -> bool:
        """Abort the room serving `request_id` (Abort RPC); False if there is none."""
        room = self.rooms.by_request(request_id)
        if room is None or room.done:
            return False
        self._abort_room(room, "Abort RPC")
        return True

    def queue_depths(self) -> dict[str, int]:
        return {"prefill_inflight": len(self.rooms)}

    # -- internals -------------------------------------------------------------------------------

    def _start(
        self, room: Room, params: SamplingParams, on_first: Callable[[RequestOutput], None] | None = None
    ) -> None:
        spec, prompt = room.attach, room.prompt
        assert spec is not None and prompt is not None
        if spec.num_prompt_tokens != len(prompt):
            room.fail(
                "INVALID_ARGUMENT",
                f"room {room.room_id}: decode attached pages for {spec.num_prompt_tokens} tokens, "
                f"the prompt has {len(prompt)}",
            )
            return
        needed = -(-len(prompt) // self.region.page_size)
        if len(spec.page_ids) < needed:
            room.fail(
                "INVALID_ARGUMENT",
                f"room {room.room_id}: decode attached {len(spec.page_ids)} pages, a "
                f"{len(prompt)}-token prompt needs {needed}",
            )
            return
        # Prefill samples exactly the first token; decode samples the rest with the same params.
        first = SamplingParams(**{**params.__dict__, "max_tokens": 1})
        listener = RoomListener(self, room, spec, on_first)

        def start() -> None:
            if room.done:  # aborted or released while this command waited in the queue
                return
            self.loop.engine.add_request(prompt, first, room.request_id, listener=listener)
            room.in_engine = True

        try:
            self.loop.run(start)
        except EngineDead as e:
            room.fail("UNAVAILABLE", f"room {room.room_id}: prefill engine is down: {e}")
        except InvalidRequestError as e:  # the id is still in use: an earlier attempt's room is ending
            room.fail("UNAVAILABLE", f"room {room.room_id}: {e}; retry")
        except Exception as e:
            room.fail("INVALID_ARGUMENT", f"room {room.room_id}: {e}")

    def _wait(self, room: Room, predicate: Callable[[], bool], timeout: float | None, caller: Caller) -> bool:
        """Wait for `predicate` (or the room's end); the caller going away aborts the room."""
        if room.wait_for(predicate, timeout, caller):
            return True
        if not caller.is_active():
            self._abort_room(room, "the caller went away")
            return True
        return False

    def _abort_room(self, room: Room, why: str) -> None:
        room.fail("ABORTED", f"room {room.room_id} aborted: {why}")
        if room.request_id:
            # Queued after any pending start (commands run in order), so it cannot miss it.
            self.loop.call(self.loop.abort, room.request_id)

    def _settle(self, room: Room) -> bool:
        return True if not room.in_engine else self.sender.settle(SETTLE_S)
