"""Per-API-key token rate limits (`moeserve serve --key-token-rate R [--key-token-burst B]`).

Each key has a bucket of up to B tokens that refills at R tokens per second. A request is let in
only if its key's bucket holds at least its prompt tokens, which are taken at once; the tokens it
generates are taken when it ends (so the bucket may go below zero: that key then waits until it
has refilled). A request refused gets 429 with `Retry-After` = the seconds until its prompt fits.
Without API keys, every client shares one bucket. Keys never appear in messages or logs.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from orchestrator.errors import ApiError
from orchestrator.events import TokenEvent


@dataclass
class TokenBuckets:
    rate: float
    """Tokens per second each key earns."""
    burst: float
    """Most tokens a key can hold."""
    clock: Callable[[], float] = time.monotonic
    _level: dict[str, tuple[float, float]] = field(default_factory=dict)
    """key -> (tokens, when)"""

    def _now(self, key: str) -> float:
        tokens, when = self._level.get(key, (self.burst, self.clock()))
        now = self.clock()
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        self._level[key] = (tokens, now)
        return tokens

    def admit(self, key: str, prompt_tokens: int) -> None:
        """Take the prompt's tokens, or raise a 429 saying when they will be there."""
        tokens = self._now(key)
        need = min(prompt_tokens, self.burst)  # a prompt larger than the burst waits for a full bucket
        if tokens < need:
            wait = math.ceil((need - tokens) / self.rate)
            raise ApiError(
                429,
                f"this API key is over its token rate ({self.rate:g} tokens/s, bursts of {self.burst:g}); "
                f"retry in {wait} s",
                "rate_limit_error",
                "token_rate_exceeded",
                headers={"Retry-After": str(wait)},
            )
        self._level[key] = (tokens - prompt_tokens, self.clock())

    def charge(self, key: str, tokens: int) -> None:
        level = self._now(key)
        self._level[key] = (level - tokens, self.clock())


async def charged(
    events: AsyncGenerator[TokenEvent, None], buckets: TokenBuckets, key: str
) -> AsyncGenerator[TokenEvent, None]:
    """`events` unchanged; when they end (however), the generated tokens are taken from `key`.
    Closing this stream closes `events` (which cancels the request on the workers)."""
    last = None
    try:
        async for last in events:
            yield last
    finally:
        await events.aclose()
        if last is not None:
            buckets.charge(key, last.completion_tokens)
