"""One generation request as the scheduler and runner see it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from services.engine.sampling import SamplingParams, TokenLogprob
from services.models.device import DeviceMark

if TYPE_CHECKING:
    from services.engine.prefix_cache import Node

FinishReason = Literal["stop", "length", "abort"]


class InvalidRequestError(ValueError):
    """A request the engine cannot take; nothing was allocated for it."""


class Phase(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    """Queued; holds no KV pages."""
    PREFILL = "prefill"
    """Admitted; its prompt is being computed chunk by chunk."""
    WAITING_FOR_KV = "waiting_for_kv"
    """Its prompt KV comes from another worker (KV hand-off): pages reserved, then filled."""
    KV_READY = "kv_ready"
    """Prompt KV in place and first token known; waits for a seat in the running batch."""
    DECODE = "decode"
    """Generating one token per step."""
    FINISHED = "finished"


class KVListener(Protocol):
    """Watches a request's KV as it is computed (the prefill side of a KV hand-off).

    Both methods run on the engine thread and must only enqueue work, never block.
    """

    def on_layer(self, layer: int, start: int, end: int, pages: list[int], written: DeviceMark) -> None:
        """Tokens [start, end) have their `layer` KV in `pages` (the request's page table) once
        `written` is passed: on a GPU the kernels are queued, not yet run, when this is called."""

    def on_finish(self, output: RequestOutput) -> None:
        """The request ended; its pages stay allocated until `Engine.release(request_id)`."""


class KVSource(Protocol):
    """Fills a WAITING_FOR_KV request's pages from another worker (the decode side of a hand-off).

    Runs on the engine thread and must only enqueue work, never block.
    """

    def on_pages(self, request_id: str, pages: list[int]) -> None:
        """The scheduler reserved `pages` for the prompt: fetch its KV into them."""


@dataclass(eq=False)
class Request:
    """A request's prompt, outputs, pages and place in the scheduler."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int | None
    """The seed of its sampling noise (`sampling.sample`); None when greedy."""
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per output token when the request asks for log-probabilities (`params.logprobs`)."""
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose KV is in this request's pages."""
    phase: Phase = Phase.WAITING
    finish_reason: FinishReason | None = None
    listener: KVListener | None = None
    """When set, pages outlive the request until released (they are being read remotely)."""
    kv_source: KVSource | None = None
    """When set, the prompt's KV is written into this request's pages by another worker."""
    cached: list[Node] = field(default_factory=list)
    """The prefix-cache path (`prefix_cache.Node`s) this request uses: its leading pages' nodes."""
    cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at admission (not computed here)."""
    kv_reported: int = 0
    """Tokens whose KV the listener has been told about (cached ones included)."""

    def append(self, token: int, logprob: TokenLogprob | None) -> None:
        """Record a generated token (and its log-probability, when the request asks for them)."""
        self.output_ids.append(token)
        if logprob is not None and self.params.logprobs is not None:
            self.output_logprobs.append(logprob)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:end] + self.output_ids[: max(0, end - n)]


@dataclass(frozen=True)
class RequestOutput:
    """What a request has produced so far; `finished` once `finish_reason` is set."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: FinishReason | None
    new_token_ids: list[int] = field(default_factory=list)
    """Tokens produced by the step that returned this output."""
    cached_tokens: int = 0
    """Prompt tokens this rank found in its prefix cache (not computed)."""
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per output token, when the request asked for log-probabilities; else empty."""

    @property
    def new_logprobs(self) -> list[TokenLogprob]:
        """The log-probabilities of `new_token_ids` (empty when not asked for)."""
        if not self.output_logprobs or not self.new_token_ids:
            return []
        return self.output_logprobs[-len(self.new_token_ids) :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
