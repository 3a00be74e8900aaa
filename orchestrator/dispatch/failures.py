"""How an attempt fails because of an instance (not the request): whom to blame, and whether the
client has seen tokens yet (retry on a fresh pair) or not (migrate what is left)."""

from __future__ import annotations

import grpc

from orchestrator.errors import ApiError
from orchestrator.fleet.registry import Instance

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}
"""Failures of an instance (not of the request) that a fresh pair may not have."""


class InstanceFailed(Exception):
    """An attempt failed because of `blame` (not the request): try elsewhere."""

    def __init__(self, blame: Instance, error: ApiError):
        self.blame, self.error = blame, error

    def charge(self, avoid: set[str], request_id: str) -> None:
        """Count it against the instance's breaker (once per request) and keep the request away from it."""
        self.blame.breaker.failure(request_id)
        avoid.add(self.blame.id)


class BeforeFirstToken(InstanceFailed):
    """Before the client saw anything: retry on a fresh pair."""


class MidStream(InstanceFailed):
    """An instance failed after tokens went out (the decode, or a prefill whose hand-off failed after
    its first token went ahead): migrate what is left to a fresh pair."""
