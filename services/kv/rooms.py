"""Bootstrap rooms: where a Generate and an Attach for the same request meet on a prefill rank.

Either may arrive first. Each side waits (with a deadline) for the other; the outcome (first
token or an error) is set once and read by both. Waits end early when the room ends or the
waiting caller goes away (its callback notifies the room), never by polling.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.calls import Caller, CallError
from services.engine.sampling import TokenLogprob
from services.kv.layout import KVLayout


@dataclass(frozen=True)
class AttachSpec:
    """A decode rank's destination for a room's prompt KV."""

    room: int
    request_id: str
    layout: KVLayout
    transfer_session: str
    """The decode rank's transfer-engine session (host:port)."""
    kv_base: int
    """Address of layer 0, slot 0 of the decode rank's KV storage."""
    layer_stride: int
    page_ids: tuple[int, ...]
    """Destination pages, in prompt order."""
    num_prompt_tokens: int
    forwarded: bytes = b""
    """Decode-first: the router's GenerateRequest (SGLang's, serialized) for prefill to run as its
    own; empty when prefill gets a Generate of its own (dual dispatch)."""
    prefill_rank: int | None = None
    """Decode-first: the prefill DP rank the router chose (None: prefill places it)."""
    token_feed: str = ""
    """Decode-first: the router's FirstTokens feed that wants the first token as it is sampled."""


@dataclass(frozen=True)
class AttachResult:
    """What prefill reports once the prompt KV is in the decode pages."""

    first_token_id: int
    prompt_tokens: int
    cached_tokens: int = 0
    """Prompt tokens prefill found in its own cache (never the transferred KV)."""
    transferred_bytes: int = 0
    first_logprob: TokenLogprob | None = None
    """The first token's log-probability, when the request asked for them."""


@dataclass(eq=False)
class Room:
    """One bootstrap room on a prefill rank."""

    room_id: int
    request_id: str | None = None
    prompt: list[int] | None = None
    attach: AttachSpec | None = None
    result: AttachResult | None = None
    error: CallError | None = None
    in_engine: bool = False
    """The request was handed to the engine (aborting it there frees its pages)."""
    users: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def fail(self, code: str, message: str, peer: str = "") -> None:
        with self.changed:
            if not self.done:
                self.error = CallError(code, message, peer)
            self.changed.notify_all()

    def succeed(self, result: AttachResult) -> None:
        with self.changed:
            if not self.done:
                self.result = result
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None, caller: Caller) -> bool:
        """Wait until `predicate()` holds or the room ends (True), or `timeout` passes or the caller
        goes away (False; check `caller.is_active()` to tell which)."""

        def poke() -> None:
            with self.changed:
                self.changed.notify_all()

        caller.add_callback(poke)
        with self.changed:
            return self.changed.wait_for(
                lambda: predicate() or self.done or not caller.is_active(), timeout=timeout
            ) and (predicate() or self.done)


class RoomTable:
    """The live rooms of a prefill rank, counted in use by the calls waiting in them."""

    def __init__(self) -> None:
        self._rooms: dict[int, Room] = {}
        self._lock = threading.Lock()

    def enter(self, room_id: int) -> Room:
        """The room (created on first use), counted as in use until `leave`."""
        with self._lock:
            room = self._rooms.setdefault(room_id, Room(room_id))
            room.users += 1
            return room

    def leave(self, room: Room) -> None:
        with self._lock:
            room.users -= 1
            if room.users == 0 and self._rooms.get(room.room_id) is room:
                del self._rooms[room.room_id]

    def get(self, room_id: int) -> Room | None:
        with self._lock:
            return self._rooms.get(room_id)

    def by_request(self, request_id: str) -> Room | None:
        with self._lock:
            return next((r for r in self._rooms.values() if r.request_id == request_id), None)

    def all(self) -> list[Room]:
        with self._lock:
            return list(self._rooms.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._rooms)
