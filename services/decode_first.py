"""Decode-first dispatch: what the orchestrator and the workers agree on beside SGLang's protocol.

SGLang's disaggregated Generate goes to both workers (dual dispatch, what SMG does): two streams per
request from the router. Decode-first sends it to the decode instance alone, with the metadata
`FORWARD` (a prefill DP rank, or `ANY_RANK`); the decode rank forwards the request to prefill in
its KV Attach (`kv_handoff.proto`), so the router holds one stream per request. A decode Generate
that fails because of its prefill says so in its trailing metadata (`FAILED_PEER` = "prefill"), so
the router avoids the right instance. Workers that serve it say so in GetServerInfo's server_args
(`SERVER_ARG` = true); the router uses it only when both sides of a pair do, and dual dispatch
otherwise (SGLang workers). Dependency-free: both sides import it.
"""

from __future__ import annotations

from collections.abc import Iterable

FORWARD = "moeserve-forward-prefill"
ANY_RANK = "any"
FAILED_PEER = "moeserve-failed-peer"
SERVER_ARG = "moeserve_decode_first"


def forward_metadata(prefill_rank: int | None) -> tuple[tuple[str, str], ...]:
    """The call metadata asking a decode instance to forward the request to prefill (rank pinned or not)."""
    return ((FORWARD, ANY_RANK if prefill_rank is None else str(prefill_rank)),)


def requested(metadata: Iterable[tuple[str, str]] | None) -> tuple[bool, int | None]:
    """Whether a call's metadata asks for decode-first, and the prefill DP rank it names."""
    for key, value in metadata or ():
        if key == FORWARD:
            return True, int(value) if value.isdigit() else None
    return False, None


def failed_peer(metadata: Iterable[tuple[str, str]] | None) -> str:
    """The role a failed call blames in its trailing metadata ("" if its own failure)."""
    return next((value for key, value in metadata or () if key == FAILED_PEER), "")
