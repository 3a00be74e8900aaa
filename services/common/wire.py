"""What the orchestrator and the workers agree on beside SGLang's protocol: decode-first dispatch.

SGLang's disaggregated Generate goes to both workers (dual dispatch, what SMG does): two streams per
request from the router. Decode-first sends it to the decode instance alone, with the metadata
`FORWARD` (a prefill DP rank, or `ANY_RANK`); the decode rank forwards the request to prefill in
its KV Attach (`kv_handoff.proto`), so the router holds one stream per request. A decode Generate
that fails because of its prefill says so in its trailing metadata (`FAILED_PEER` = "prefill"), so
the router avoids the right instance. With `TOKEN_FEED` (the router's feed id) the prefill also
sends the request's first token on the router's FirstTokens stream as soon as it is sampled
(`kv_handoff.proto`). Workers that serve it say so in GetServerInfo's server_args
(`SERVER_ARG` = true); the router uses it only when both sides of a pair do, and dual dispatch
otherwise (SGLang workers).

Workers' gRPC takes no API key, so it has a shared token of its own: with `TOKEN_ENV` set, a
moeserve worker refuses (UNAUTHENTICATED) every call without `authorization: Bearer <token>`,
and every moeserve client of a worker (the orchestrator, a decode forwarding to its prefill, the
CLIs, the image's health check) sends it. Dependency-free: both sides import it.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable

FORWARD = "moeserve-forward-prefill"
TOKEN_FEED = "moeserve-token-feed"
ANY_RANK = "any"
FAILED_PEER = "moeserve-failed-peer"
SERVER_ARG = "moeserve_decode_first"
TOKEN_ENV = "MOESERVE_GRPC_TOKEN"
AUTH_KEY = "authorization"


def grpc_token() -> str:
    """The workers' shared gRPC token ("" when none is set: calls need none)."""
    return os.environ.get(TOKEN_ENV, "")


def auth_metadata(token: str | None = None) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying `token` (default: this process's), or nothing without one."""
    token = grpc_token() if token is None else token
    return ((AUTH_KEY, f"Bearer {token}"),) if token else ()


def authorized(metadata: Iterable[tuple[str, str | bytes]] | None, token: str) -> bool:
    """Whether a call's metadata carries `token` (compared in constant time)."""
    given = next((v for k, v in metadata or () if k == AUTH_KEY), "")
    given = given.decode() if isinstance(given, bytes) else given
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def forward_metadata(prefill_rank: int | None, feed: str = "") -> tuple[tuple[str, str], ...]:
    """The call metadata asking a decode instance to forward the request to prefill (rank pinned or
    not), and the prefill to send its first token on the router's `feed` too (if any)."""
    forward = ((FORWARD, ANY_RANK if prefill_rank is None else str(prefill_rank)),)
    return (*forward, (TOKEN_FEED, feed)) if feed else forward


def requested(metadata: Iterable[tuple[str, str]] | None) -> tuple[bool, int | None, str]:
    """Whether a call's metadata asks for decode-first, the prefill DP rank and the feed it names."""
    forward, rank, feed = False, None, ""
    for key, value in metadata or ():
        if key == FORWARD:
            forward, rank = True, int(value) if value.isdigit() else None
        elif key == TOKEN_FEED:
            feed = value
    return forward, rank, feed


def failed_peer(metadata: Iterable[tuple[str, str]] | None) -> str:
    """The role a failed call blames in its trailing metadata ("" if its own failure)."""
    return next((value for key, value in metadata or () if key == FAILED_PEER), "")
