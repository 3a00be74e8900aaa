"""Who gets in: a slot per request in flight (429 when none is free), and none once the server stops.

Stopping also ends the requests already in: whatever awaits their next event through
`Admission.next` gets a 503 ApiError at once, and the awaited event's stream is cancelled (which
cancels the worker calls).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

from orchestrator.errors import ApiError

T = TypeVar("T")
RETRY_AFTER_S = 1


class Slot:
    """One request's place in flight, given back exactly once whichever path ends the request."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._admission.in_flight -= 1


class Admission:
    """At most `limit` requests in flight; after `close()`, none."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self.closing = False
        self._waits: set[asyncio.Timeout] = set()

    def admit(self) -> Slot:
        """A slot for a new request, or ApiError 503 (server stopping) or 429 with Retry-After (full)."""
        if self.closing:
            raise shutting_down()
        if self.in_flight >= self.limit:
            raise ApiError(
                429,
                f"over {self.limit} requests in flight; retry shortly",
                "rate_limit_error",
                "too_many_requests",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.in_flight += 1
        return Slot(self)

    def close(self) -> None:
        """Stops admitting and ends every wait in `next` (call it on the event loop's thread)."""
        self.closing = True
        for wait in self._waits:
            wait.reschedule(-1.0)  # already due: its task is cancelled on the next loop turn

    async def next(self, events: AsyncIterator[T]) -> T | None:
        """The next item of `events` (None at its end), or ApiError 503 once the server is stopping."""
        if self.closing:
            raise shutting_down()
        wait = asyncio.timeout(None)
        try:
            async with wait:
                self._waits.add(wait)
                try:
                    return await anext(events)
                except StopAsyncIteration:
                    return None
                finally:
                    self._waits.discard(wait)
        except TimeoutError:
            if wait.expired():
                raise shutting_down() from None
            raise


def shutting_down() -> ApiError:
    return ApiError(
        503, "the server is shutting down; retry the request", "service_unavailable", "server_shutting_down"
    )
