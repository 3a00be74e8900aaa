"""How a call ends badly, and who waits for it; transport-neutral (no gRPC here).

One error type for every call a worker serves or makes: a KV hand-off step, a call rank 0 hands a
rank, an Attach to a prefill instance. Codes are the canonical status names (`UNAVAILABLE`,
`DEADLINE_EXCEEDED`, ...) that rank 0's gRPC services turn into gRPC status codes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class CallError(Exception):
    """A call failed: `code` (a canonical status name) and a message saying what to do."""

    def __init__(self, code: str, message: str, peer: str = ""):
        super().__init__(message)
        self.code, self.message = code, message
        self.peer = peer
        """The role whose failure this is when it is not the reporting side's own ("prefill" for a
        decode whose Attach failed), so a router can tell which instance to avoid."""

    def __reduce__(self) -> tuple[type[CallError], tuple[str, str, str]]:
        return CallError, (self.code, self.message, self.peer)  # it crosses to rank 0 pickled


class Caller(Protocol):
    """The party waiting on a call (a gRPC context, or a call handed to a rank): it may go away."""

    def is_active(self) -> bool:
        """False once the caller has gone away."""

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run `callback` when the call ends or the caller goes away."""
