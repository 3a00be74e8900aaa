"""Who gets in: a slot per request in flight, a bounded queue to wait for one, and none once the
server stops. Beyond the slots and the queue (or past the queue's timeout): 429 with Retry-After.

Stopping also ends the requests already in: whatever awaits their next event through
`Admission.next` gets a 503 ApiError at once, and the awaited event's stream is cancelled (which
cancels the worker calls).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, TypeVar, cast

from orchestrator.errors import ApiError

T = TypeVar("T")
RETRY_AFTER_S = 1


class Slot:
    """One request's place in flight, given back exactly once whichever path ends the request."""

    def __init__(self, admission: Admission, waited: float = 0.0):
        self._admission = admission
        self.held = True
        self.waited = waited
        """Seconds the request waited in the queue for this slot."""

    def release(self) -> None:
        if self.held:
            self.held = False
            self._admission.released()


class Admission:
    """At most `limit` requests in flight and `queue` waiting (each at most `queue_timeout_s`);
    after `close()`, none."""

    def __init__(self, limit: int, queue: int = 0, queue_timeout_s: float = 10.0):
        self.limit, self.queue_limit, self.queue_timeout_s = limit, queue, queue_timeout_s
        self.in_flight = 0
        self.closing = False
        self._readers: set[asyncio.Task[Any]] = set()
        """Tasks awaiting an event in `next`."""
        self._stopped: set[asyncio.Task[Any]] = set()
        """Readers that `close` cancelled (their `next` answers 503)."""
        self._queue: deque[asyncio.Future[None]] = deque()

    async def enter(self) -> Slot:
        """A slot now, or once one frees up while waiting in the queue; 429 when the queue is full
        or the wait times out, 503 when the server stops meanwhile."""
        if self.closing:
            raise shutting_down()
        if self.in_flight < self.limit and not self._queue:
            return self.admit()
        if len(self._queue) >= self.queue_limit:
            raise self._full(f"and the wait queue ({self.queue_limit}) is full")
        start = time.monotonic()
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(turn)
        try:
            await asyncio.wait({turn}, timeout=self.queue_timeout_s)
        except asyncio.CancelledError:  # the client left while waiting
            self._leave(turn)
            raise
        if not turn.done():
            self._leave(turn)
            raise self._full(f"and a place did not free up within {self.queue_timeout_s:g}s")
        turn.result()  # 503 if the server stopped meanwhile
        return Slot(self, time.monotonic() - start)  # `released` counted it in flight already

    def _leave(self, turn: asyncio.Future[None]) -> None:
        if turn in self._queue:
            self._queue.remove(turn)
        elif turn.done() and turn.exception() is None:  # handed a place it will not use
            self.released()

    def released(self) -> None:
        """A slot came back: hand it to the longest waiter, if any."""
        self.in_flight -= 1
        while self._queue and self.in_flight < self.limit:
            turn = self._queue.popleft()
            if not turn.done():
                self.in_flight += 1
                turn.set_result(None)

    def _full(self, why: str) -> ApiError:
        return ApiError(
            429,
            f"over {self.limit} requests in flight {why}; retry shortly",
            "rate_limit_error",
            "too_many_requests",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    def admit(self) -> Slot:
        """A slot for a new request, or ApiError 503 (server stopping) or 429 with Retry-After (full)."""
        if self.closing:
            raise shutting_down()
        if self.in_flight >= self.limit:
            raise self._full("and no queue to wait in")
        self.in_flight += 1
        return Slot(self)

    def close(self) -> None:
        """Stops admitting and ends every wait in `next` (call it on the event loop's thread)."""
        self.closing = True
        while self._queue:
            turn = self._queue.popleft()
            if not turn.done():
                turn.set_exception(shutting_down())
        for task in self._readers:  # cancelled, each `next` answers 503 instead
            self._stopped.add(task)
            task.cancel()

    async def next(self, events: AsyncIterator[T]) -> T | None:
        """The next item of `events` (None at its end), or ApiError 503 once the server is stopping."""
        if self.closing:
            raise shutting_down()
        task = cast("asyncio.Task[Any]", asyncio.current_task())  # awaited in a task: never None
        self._readers.add(task)
        try:
            return await anext(events)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if task not in self._stopped:
                raise
            self._stopped.discard(task)
            task.uncancel()
            raise shutting_down() from None
        finally:
            self._readers.discard(task)


def shutting_down() -> ApiError:
    return ApiError(
        503, "the server is shutting down; retry the request", "service_unavailable", "server_shutting_down"
    )
