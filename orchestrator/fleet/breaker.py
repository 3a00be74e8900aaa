"""A circuit breaker per instance: consecutive failures stop its traffic; a probe lets it back.

    closed --(failures of `threshold` distinct requests in a row)--> open --(cooldown)--> half-open
    half-open --(its one probe request succeeds)--> closed;  --(fails)--> open again

Only requests that reach their first token count as successes; a failure is a request this
instance made fail before then (refused, unreachable, a failed hand-off). Failures count per
request: one request retried, or charging the same instance twice, is one failure, so no single
request (a poison one the workers cannot tell from their own fault) opens a breaker. Failures
the request itself caused (INVALID_ARGUMENT, OUT_OF_RANGE) are never charged at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

THRESHOLD = 3
COOLDOWN_S = 5.0


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class Breaker:
    threshold: int = THRESHOLD
    cooldown_s: float = COOLDOWN_S
    failures: int = 0
    """Distinct requests that failed here since the last success."""
    opened_at: float | None = None
    probing: bool = False
    """A half-open breaker's one request is out."""
    opened: int = field(default=0)
    """How many times it opened (for metrics and tests)."""
    _failed: set[str] = field(default_factory=set, repr=False)

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if time.monotonic() - self.opened_at < self.cooldown_s:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def allows(self) -> bool:
        state = self.state
        return state == BreakerState.CLOSED or (state == BreakerState.HALF_OPEN and not self.probing)

    def picked(self) -> None:
        if self.state == BreakerState.HALF_OPEN:
            self.probing = True

    def success(self) -> None:
        self.failures, self.opened_at, self.probing = 0, None, False
        self._failed.clear()

    def failure(self, request_id: str) -> None:
        if self.state != BreakerState.HALF_OPEN and request_id in self._failed:
            return  # the same request again: one failure
        self._failed.add(request_id)
        self.failures = len(self._failed)
        if self.state == BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self.opened_at, self.probing = time.monotonic(), False
            self.opened += 1
            self._failed.clear()
