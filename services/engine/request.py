"""One generation request as the scheduler and runner see it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from services.engine.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


class Phase(enum.Enum):
    WAITING = "waiting"
    """Queued; holds no KV pages."""
    PREFILL = "prefill"
    """Admitted; its prompt is being computed chunk by chunk."""
    DECODE = "decode"
    """Generating one token per step."""
    FINISHED = "finished"


class KVListener(Protocol):
    """Watches a request's KV as it is computed (the prefill side of a KV hand-off).

    Both methods run on the engine thread and must only enqueue work, never block.
    """

    def on_layer(self, layer: int, start: int, end: int, pages: list[int]) -> None:
        """Tokens [start, end) now have their `layer` KV in `pages` (the request's page table)."""

    def on_finish(self, output: RequestOutput) -> None:
        """The request ended; its pages stay allocated until `Engine.release(request_id)`."""


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose KV is in this request's pages."""
    phase: Phase = Phase.WAITING
    finish_reason: FinishReason | None = None
    listener: KVListener | None = None
    """When set, pages outlive the request until released (they are being read remotely)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
