"""What crosses the boundary between an instance's DP controller (rank 0) and its ranks.

Every call the controller hands a rank is a `Command` with a call id; the rank answers with
`Reply` values (a stream for Generate; one value otherwise, after a `FirstToken` for an Attach
whose router takes first tokens ahead), then `End`, or with one `Failure`.
`Cancel` tells the rank that the caller went away. Messages are plain frozen dataclasses, pickled
on the wire between processes (instance ranks trust each other, as torch.distributed ranks do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from services.common.calls import CallError
from services.engine import RequestOutput
from services.engine.stats import StepStats
from services.kv import AttachSpec
from services.kv.sender import TransferStats


@dataclass(frozen=True)
class Command:
    """A call handed to one rank."""

    call_id: int


@dataclass(frozen=True)
class Generate(Command):
    """SGLang's GenerateRequest, serialized: replies are serialized GenerateResponses."""

    request: bytes = b""
    forward: bool = False
    """Decode-first (decode only): forward the request to prefill in the KV Attach."""
    prefill_rank: int | None = None
    """Decode-first: the prefill DP rank the router chose for it."""
    token_feed: str = ""
    """Decode-first: the router's FirstTokens feed on the prefill instance ("": none)."""


@dataclass(frozen=True)
class Attach(Command):
    """A decode rank attaches its pages to a room on this (prefill) rank: replies an AttachResult."""

    spec: AttachSpec | None = None


@dataclass(frozen=True)
class FirstToken:
    """Prefill (decode-first): a forwarded request's first token, replied on its Attach call ahead of
    the AttachResult, for the router's FirstTokens feed."""

    room: int
    request_id: str
    token_id: int
    prompt_tokens: int
    cached_tokens: int

    @classmethod
    def of(cls, room: int, request_id: str, out: RequestOutput) -> FirstToken:
        """From the prompt's output on the prefill rank (its one token is the first)."""
        return cls(room, request_id, out.output_token_ids[0], len(out.prompt_token_ids), out.cached_tokens)


@dataclass(frozen=True)
class Release(Command):
    """Decode gives up on a room: replies whether the room was live."""

    room: int = 0
    reason: str = ""


@dataclass(frozen=True)
class Abort(Command):
    """Abort a request wherever it is on this rank: replies whether it was found."""

    request_id: str = ""


@dataclass(frozen=True)
class KvEvents(Command):
    """The rank's prefix-cache events after cursor `since`: replies a `KvEventPage`."""

    since: int = 0


@dataclass(frozen=True)
class SetPlacement(Command):
    """Switch to this expert placement ([moe layers][slots]) at the step the whole group agrees on:
    replies True once it is pending here (False if another one still is)."""

    phy2log: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class FlushCache(Command):
    """Drop the rank's unused prefix-cache pages: replies how many."""


Query = Literal["load", "health", "expert_load", "metrics", "placement"]


@dataclass(frozen=True)
class Ask(Command):
    """A read-only question: replies a `RankLoad`, `RankHealth`, `ExpertLoad`, `RankMetrics` or (placement)
    the number of placements the rank has switched to."""

    what: Query = "health"


@dataclass(frozen=True)
class Cancel:
    """The caller of `call_id` went away: stop the call and free what it holds."""

    call_id: int


@dataclass(frozen=True)
class Reply:
    """One value of a call's answer."""

    call_id: int
    value: Any


@dataclass(frozen=True)
class End:
    """The call answered everything."""

    call_id: int


@dataclass(frozen=True)
class Failure:
    """The call failed."""

    call_id: int
    error: CallError


Event = Reply | End | Failure


@dataclass(frozen=True)
class KvEvent:
    """One change of a rank's prefix cache, numbered in the rank's event log."""

    seq: int
    kind: str
    """stored | removed | cleared"""
    hashes: tuple[int, ...]
    parent: int = 0


@dataclass(frozen=True)
class KvEventPage:
    """Events after a cursor: the events, the next cursor, and whether some were lost before them."""

    events: tuple[KvEvent, ...]
    next_seq: int
    lost: bool


@dataclass(frozen=True)
class RankLoad:
    """One DP rank's load, as GetLoads reports it."""

    running: int
    waiting: int
    used_tokens: int
    total_tokens: int
    max_num_seqs: int
    queues: dict[str, int] = field(default_factory=dict)
    """Hand-off queue depths (prefill_inflight, decode_prealloc, decode_transfer) and stranded_pages."""
    transfer: TransferStats = field(default_factory=TransferStats)
    """Prefill KV transfer totals (zero on decode)."""
    cached_pages: int = 0
    """Pages in the prefix cache (used by requests or evictable)."""
    evictable_pages: int = 0
    prompt_tokens: int = 0
    """Prompt tokens admitted so far, and of those, found in the prefix cache:"""
    cached_tokens: int = 0

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True)
class RankHealth:
    """Whether the rank's engine loop runs."""

    healthy: bool
    message: str


@dataclass(frozen=True)
class ExpertLoad:
    """Tokens per logical expert per MoE layer over the rank's window."""

    counts: list[list[int]]
    tokens: int
    steps: int


@dataclass(frozen=True)
class RankMetrics:
    """What the worker's `/metrics` shows of one DP rank: its load and its engine's step statistics."""

    load: RankLoad
    steps: StepStats
