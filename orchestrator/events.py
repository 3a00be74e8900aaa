"""What flows from the workers to the HTTP edge: a request's token events, in one place.

Dispatch produces them (one attempt, retries, migrations), metrics and rate limits watch them
pass, the HTTP edge turns them into text. Each layer imports them from here, never from another.
"""

from __future__ import annotations

from dataclasses import dataclass

from smg_grpc_proto import sglang_scheduler_pb2 as pb


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprobs_from_proto(msg: pb.OutputLogProbs) -> tuple[TokenLogprob, ...]:
    """SGLang's `OutputLogProbs` (columns) as one `TokenLogprob` per token."""
    tops = list(msg.top_logprobs) or [pb.TopLogProbs()] * len(msg.token_ids)
    return tuple(
        TokenLogprob(tid, lp, tuple(zip(top.token_ids, top.values, strict=True)))
        for tid, lp, top in zip(msg.token_ids, msg.token_logprobs, tops, strict=True)
    )


@dataclass(frozen=True)
class TokenEvent:
    """New tokens from the decode worker; the last event carries the finish reason."""

    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    """Those of `token_ids`, when the request asked for log-probabilities."""
