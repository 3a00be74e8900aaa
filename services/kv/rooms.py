"""Bootstrap rooms: where a Generate and an Attach for the same request meet on a prefill worker.

Either may arrive first. Each side waits (with a deadline) for the other; the outcome (first
token or an error status) is set once and read by both.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import grpc

from services.proto.moeserve.v1 import kv_handoff_pb2 as kvpb


@dataclass
class RoomError:
    code: grpc.StatusCode
    message: str


@dataclass(eq=False)
class Room:
    room_id: int
    request_id: str | None = None
    prompt: list[int] | None = None
    attach: kvpb.AttachRequest | None = None
    result: kvpb.AttachResponse | None = None
    error: RoomError | None = None
    in_engine: bool = False
    """The request was handed to the engine (aborting it there frees its pages)."""
    users: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        with self.changed:
            if not self.done:
                self.error = RoomError(code, message)
            self.changed.notify_all()

    def succeed(self, result: kvpb.AttachResponse) -> None:
        with self.changed:
            if not self.done:
                self.result = result
            self.changed.notify_all()

    def wait_for(self, predicate, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate() or self.done, timeout=timeout)


class RoomTable:
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

    def __len__(self) -> int:
        with self._lock:
            return len(self._rooms)
