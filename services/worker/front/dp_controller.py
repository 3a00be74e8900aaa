"""Rank 0's data-parallel controller: places each request on a DP rank and carries calls to ranks.

A Generate goes to the DP rank the caller pinned (`data_parallel_rank`) or to the least loaded
one (ties round-robin); on a prefill instance a bootstrap room's Generate and Attach go to the
same rank, whichever arrives first. Calls travel as `messages.Command`s over each rank's link
(in process for rank 0, ZeroMQ for the others) and their answers come back as events; there is
no gRPC between ranks. If the instance's engine stops, every call in flight fails at once.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from services.common.calls import CallError
from services.common.picking import LeastLoaded
from services.worker import messages as msg
from services.worker.channels import Link


class RankCallHandle:
    """The controller's end of one call: iterate for its values, `cancel` if the caller goes away."""

    def __init__(self, controller: DPController, rank: int, call_id: int):
        self.controller, self.rank, self.call_id = controller, rank, call_id
        self.events: queue.SimpleQueue[msg.Event] = queue.SimpleQueue()
        self.done = False

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                event = self.events.get()
                if isinstance(event, msg.Reply):
                    yield event.value
                elif isinstance(event, msg.End):
                    return
                else:
                    raise event.error
        finally:
            self.done = True
            self.controller._forget(self.call_id)

    def result(self, timeout: float | None = None) -> Any:
        """The single value of a unary call; CallError (DEADLINE_EXCEEDED after `timeout`)."""
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            self.cancel()
            raise CallError(
                "DEADLINE_EXCEEDED", f"DP rank {self.rank} did not answer in {timeout}s"
            ) from None
        finally:
            self.controller._forget(self.call_id)
        if isinstance(event, msg.Failure):
            raise event.error
        if isinstance(event, msg.End):
            raise CallError("INTERNAL", f"DP rank {self.rank} answered nothing")
        return event.value

    def cancel(self) -> None:
        if not self.done:
            with contextlib.suppress(ConnectionError):  # a rank that is gone has nothing to stop
                self.controller.links[self.rank].send(msg.Cancel(self.call_id))


@dataclass
class _Room:
    rank: int
    users: int = 0


class DPController:
    """Placement and calls for the DP ranks of one instance (rank 0 only)."""

    def __init__(self, links: list[Link], pids: list[int]):
        self.links, self.pids = links, pids
        self.inflight = [0] * len(links)
        """Generate calls in flight per rank (the least-load signal)."""
        self._picker = LeastLoaded()
        self._rooms: dict[int, _Room] = {}
        self._calls: dict[int, RankCallHandle] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()  # enter_room places a new room while holding it
        self.down: str | None = None
        """Why the instance is out of service (its engine stopped), once it is."""

    @property
    def size(self) -> int:
        return len(self.links)

    # -- placement -------------------------------------------------------------------------------

    def place(self, pinned: int | None) -> int:
        """The DP rank for a request: `pinned` if given (ValueError when out of range), else least loaded."""
        if pinned is not None:
            if not 0 <= pinned < self.size:
                raise ValueError(
                    f"data_parallel_rank {pinned} is out of range; this instance has {self.size} DP ranks"
                )
            return pinned
        with self._lock:
            return self._picker.pick(range(self.size), lambda r: self.inflight[r])

    def started(self, rank: int) -> None:
        """A Generate is now running on `rank`."""
        with self._lock:
            self.inflight[rank] += 1

    def finished(self, rank: int) -> None:
        with self._lock:
            self.inflight[rank] -= 1

    def enter_room(self, room: int, choose: Callable[[], int]) -> int:
        """The rank serving `room` (chosen by `choose()` on first use), held until `leave_room`."""
        with self._lock:
            entry = self._rooms.get(room)
            if entry is None:
                entry = self._rooms[room] = _Room(choose())
            entry.users += 1
            return entry.rank

    def leave_room(self, room: int) -> None:
        with self._lock:
            entry = self._rooms.get(room)
            if entry is not None:
                entry.users -= 1
                if entry.users <= 0:
                    del self._rooms[room]

    def room_rank(self, room: int) -> int | None:
        with self._lock:
            entry = self._rooms.get(room)
            return None if entry is None else entry.rank

    # -- calls -----------------------------------------------------------------------------------

    def call(self, rank: int, make: Callable[[int], msg.Command]) -> RankCallHandle:
        """Hand `make(call_id)` to `rank`; the handle yields its answer."""
        with self._lock:
            call_id = next(self._ids)
            handle = self._calls[call_id] = RankCallHandle(self, rank, call_id)
            down = self.down
        if down is not None:
            handle.events.put(msg.Failure(call_id, CallError("UNAVAILABLE", down)))
            return handle
        try:
            self.links[rank].send(make(call_id))
        except ConnectionError as e:
            handle.events.put(
                msg.Failure(call_id, CallError("UNAVAILABLE", f"DP rank {rank} is unreachable: {e}"))
            )
        return handle

    def ask_all(self, what: msg.Query, timeout: float) -> list[Any]:
        """Ask every rank the same question; CallError names the first rank that did not answer."""
        handles = [self.call(r, lambda cid: msg.Ask(cid, what)) for r in range(self.size)]
        out = []
        try:
            for handle in handles:
                try:
                    out.append(handle.result(timeout))
                except CallError as e:
                    raise CallError(e.code, f"EP rank {handle.rank}: {e.message}") from None
        finally:
            for handle in handles:
                self._forget(handle.call_id)
        return out

    def on_event(self, event: msg.Event) -> None:
        """An event from a rank (its channel's thread, or rank 0's own call threads)."""
        with self._lock:
            handle = self._calls.get(event.call_id)
        if handle is not None:
            handle.events.put(event)

    def fail_all(self, why: str) -> None:
        """The instance is out of service: every call in flight (and every later one) fails with `why`."""
        with self._lock:
            self.down = why
            handles = list(self._calls.values())
        for handle in handles:
            handle.events.put(msg.Failure(handle.call_id, CallError("UNAVAILABLE", why)))

    def _forget(self, call_id: int) -> None:
        with self._lock:
            self._calls.pop(call_id, None)
