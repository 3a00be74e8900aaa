"""How a hand-off call ends badly, and who waits for it; transport-neutral (no gRPC here).

Codes are the canonical status names (`UNAVAILABLE`, `DEADLINE_EXCEEDED`, ...) that the worker's
gRPC adapters turn into gRPC status codes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class HandoffError(Exception):
    """A hand-off step failed: `code` (a canonical status name) and a message saying what to do."""

    def __init__(self, code: str, message: str, peer: str = ""):
        super().__init__(message)
        self.code, self.message = code, message
        self.peer = peer
        """The role whose failure this is when it is not the reporting side's own ("prefill" for a
        decode whose Attach failed), so a router can tell which instance to avoid."""


class Caller(Protocol):
    """The party waiting on a call (a gRPC context, or a call handed to a rank): it may go away."""

    def is_active(self) -> bool:
        """False once the caller has gone away."""

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run `callback` when the call ends or the caller goes away."""
