"""A request's tokens from the workers, whatever fails on the way: retries on fresh pairs before
the first token, migration to a fresh pair after it (`attempt` runs each try on one pair)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

from smg_grpc_proto import sglang_scheduler_pb2 as pb

from orchestrator import metrics
from orchestrator.dispatch.attempt import attempt
from orchestrator.dispatch.failures import BeforeFirstToken, MidStream
from orchestrator.dispatch.router import NoWorkers, Router
from orchestrator.errors import ApiError
from orchestrator.events import TokenEvent

MAX_ATTEMPTS = 3
"""Tries of one segment: its retries (2) stay under a breaker's threshold (3 distinct requests)."""
RETRY_BUDGET_S = 30.0
BACKOFF_S = 0.05
MAX_MIGRATIONS = 2
"""How many times one request may move to a fresh pair after its first token."""


async def generate(
    router: Router,
    prompt_ids: list[int],
    sampling: pb.SamplingParams,
    request_id: str,
    logprobs: int | None = None,
) -> AsyncIterator[TokenEvent]:
    """The decode worker's token stream; raises ApiError when no worker can take it or a worker fails.

    `logprobs` (k >= 0) asks for each token's log-probability with k alternatives.

    A failure before the first token (an instance refusing, unreachable, a failed KV hand-off) is
    retried on a fresh pair — up to MAX_ATTEMPTS within RETRY_BUDGET_S, with jittered backoff —
    and counts against the failing instance's circuit breaker; the client sees none of it.
    A decode instance that fails mid-stream is migrated from: the prompt plus the tokens already
    sent go to a fresh pair (the prefill recomputes them) for what is left of `max_tokens`, and
    the stream goes on with no token repeated or missing; usage counts what the client got.
    Greedy requests continue exactly; sampled ones continue with the request's seed restarted.
    """
    generated: list[int] = []
    avoid: set[str] = set()
    for migration in range(MAX_MIGRATIONS + 1):
        left = sampling.max_new_tokens - len(generated)
        if generated and left <= 0:
            yield TokenEvent([], "length", len(prompt_ids), len(generated))
            return
        part = pb.SamplingParams()
        part.CopyFrom(sampling)
        part.max_new_tokens = left
        segment_id = request_id if not migration else f"{request_id}-m{migration}"
        base = len(generated)  # tokens sent before this segment; its worker counts from zero
        try:
            segment = _with_retries(
                router, [*prompt_ids, *generated], part, segment_id, avoid, logprobs, request_id
            )
            async for event in segment:
                generated += event.token_ids
                yield TokenEvent(
                    event.token_ids, event.finish_reason, len(prompt_ids), base + event.completion_tokens,
                    event.cached_tokens, event.logprobs,
                )  # fmt: skip
            return
        except MidStream as moved:
            moved.charge(avoid, request_id)
            if migration == MAX_MIGRATIONS:
                raise moved.error from None
            metrics.MIGRATIONS.inc()


async def _with_retries(
    router: Router,
    prompt_ids: list[int],
    sampling: pb.SamplingParams,
    request_id: str,
    avoid: set[str],
    logprobs: int | None,
    origin: str,
) -> AsyncIterator[TokenEvent]:
    """One segment of a request (`origin`: the client's request, which breakers count once),
    retried on fresh pairs until its first token."""
    deadline = time.monotonic() + RETRY_BUDGET_S
    last: ApiError | None = None
    for tries in range(MAX_ATTEMPTS):
        # Each attempt has an id of its own on the workers: a failed attempt's aborts, which may
        # reach a worker late, must never match its retry there (SGLang aborts by request id).
        attempt_id = request_id if tries == 0 else f"{request_id}-r{tries}"
        try:
            lease = router.lease(attempt_id, frozenset(avoid), prompt_ids)
        except NoWorkers as e:
            if last is not None:  # the failure that started the retry says more
                message = f"{last}; no instance left to retry on ({e})"
                raise ApiError(last.status, message, last.type) from None
            raise ApiError(503, str(e), "service_unavailable") from None
        try:
            async for event in attempt(lease, prompt_ids, sampling, attempt_id, logprobs):
                yield event
            return
        except BeforeFirstToken as failed:
            failed.charge(avoid, origin)
            last = failed.error
            metrics.RETRIES.inc()
            if tries + 1 == MAX_ATTEMPTS or time.monotonic() > deadline:
                raise failed.error from None
            await asyncio.sleep(BACKOFF_S * 2**tries * (0.5 + random.random()))
