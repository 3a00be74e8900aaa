"""One request through a (prefill, decode) pair: the same GenerateRequest goes to both, the
client sees the decode stream. If the request ends early (client gone, stop string, error,
shutdown) both calls are cancelled and both workers get an Abort, so no KV stays behind."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from orchestrator import metrics
from orchestrator.errors import ApiError, upstream_error
from orchestrator.logprobs import TokenLogprob, from_proto
from orchestrator.registry import Instance, State
from orchestrator.router import Lease, NoWorkers, Router

REQUEST_TIMEOUT_S = 600.0
_background: set[asyncio.Future] = set()
"""Aborts and prefill drains still running after their request ended (kept referenced until done)."""


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
MAX_ATTEMPTS = 3
RETRY_BUDGET_S = 30.0
BACKOFF_S = 0.05


MAX_MIGRATIONS = 2
"""How many times one request may move to a fresh pair after its first token."""


class _InstanceFailed(Exception):
    """An attempt failed because of `blame` (not the request): try elsewhere."""

    def __init__(self, blame: Instance, error: ApiError):
        self.blame, self.error = blame, error

    def charge(self, avoid: set[str]) -> None:
        """Count it against the instance's breaker and keep the request away from it."""
        self.blame.breaker.failure()
        avoid.add(self.blame.id)


class _BeforeFirstToken(_InstanceFailed):
    """Before the client saw anything: retry on a fresh pair."""


class _MidStream(_InstanceFailed):
    """The decode instance failed after tokens went out: migrate what is left to a fresh pair."""


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
            segment = _with_retries(router, [*prompt_ids, *generated], part, segment_id, avoid, logprobs)
            async for event in segment:
                generated += event.token_ids
                yield TokenEvent(
                    event.token_ids, event.finish_reason, len(prompt_ids), base + event.completion_tokens,
                    event.cached_tokens, event.logprobs,
                )  # fmt: skip
            return
        except _MidStream as moved:
            moved.charge(avoid)
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
) -> AsyncIterator[TokenEvent]:
    """One segment of a request, retried on fresh pairs until its first token."""
    deadline = time.monotonic() + RETRY_BUDGET_S
    last: ApiError | None = None
    for attempt in range(MAX_ATTEMPTS):
        try:
            lease = router.lease(request_id, frozenset(avoid), prompt_ids)
        except NoWorkers as e:
            if last is not None:  # the failure that started the retry says more
                message = f"{last}; no instance left to retry on ({e})"
                raise ApiError(last.status, message, last.type) from None
            raise ApiError(503, str(e), "service_unavailable") from None
        try:
            async for event in _attempt(lease, prompt_ids, sampling, request_id, logprobs):
                yield event
            return
        except _BeforeFirstToken as failed:
            failed.charge(avoid)
            last = failed.error
            metrics.RETRIES.inc()
            if attempt + 1 == MAX_ATTEMPTS or time.monotonic() > deadline:
                raise failed.error from None
            await asyncio.sleep(BACKOFF_S * 2**attempt * (0.5 + random.random()))


async def _attempt(
    lease: Lease, prompt_ids: list[int], sampling: pb.SamplingParams, request_id: str, logprobs: int | None
) -> AsyncIterator[TokenEvent]:
    prefill, decode = lease.prefill, lease.decode
    request = pb.GenerateRequest(
        request_id=request_id,
        tokenized=pb.TokenizedInput(input_ids=prompt_ids),
        sampling_params=sampling,
        disaggregated_params=pb.DisaggregatedParams(
            bootstrap_host=prefill.bootstrap[0],
            bootstrap_port=prefill.bootstrap[1],
            bootstrap_room=lease.room,
        ),
        stream=True,
        return_logprob=logprobs is not None,
        top_logprobs_num=logprobs or 0,
        logprob_start_len=-1,
    )
    to_prefill = request
    if lease.prefill_rank is not None:  # the prefill rank whose cache holds the prefix; decode picks its own
        to_prefill = pb.GenerateRequest()
        to_prefill.CopyFrom(request)
        to_prefill.data_parallel_rank = lease.prefill_rank
    pcall = dcall = prefill_done = None
    finished = started = False
    try:
        pcall = prefill.stub.Generate(to_prefill, timeout=REQUEST_TIMEOUT_S)
        dcall = decode.stub.Generate(request, timeout=REQUEST_TIMEOUT_S)
        prefill_done = _keep(asyncio.ensure_future(_drain(pcall)))
        responses = dcall.__aiter__()
        try:
            while True:
                if started:
                    resp = await responses.__anext__()
                else:  # before the first token, a failed prefill ends the attempt at once
                    resp = await _first(responses, prefill_done, prefill)
                    started = True
                    prefill.breaker.success()
                    decode.breaker.success()
                if resp.HasField("chunk"):
                    c = resp.chunk
                    lps = from_proto(c.output_logprobs) if c.HasField("output_logprobs") else ()
                    yield TokenEvent(
                        list(c.token_ids), None, c.prompt_tokens, c.completion_tokens, c.cached_tokens, lps
                    )
                else:
                    c = resp.complete
                    finished = True
                    if c.finish_reason == "abort":
                        _raise_if_drained(prefill, decode)
                    yield TokenEvent(
                        [], c.finish_reason, c.prompt_tokens, c.completion_tokens, c.cached_tokens
                    )
        except StopAsyncIteration:
            pass
        except grpc.aio.AioRpcError as e:
            error = upstream_error("decode", decode.address, e.code(), e.details())
            if e.code() in RETRYABLE:
                raise (_MidStream if started else _BeforeFirstToken)(decode, error) from None
            raise error from None
        if not finished:
            error = ApiError(502, f"decode worker {decode.address} ended the stream early", "upstream_error")
            raise (_MidStream if started else _BeforeFirstToken)(decode, error)
    finally:
        if not finished:
            for call in (pcall, dcall):
                if call is not None:
                    call.cancel()
            # Belt and braces: the cancellations already abort on the workers.
            for worker in (prefill, decode):
                _keep(asyncio.get_running_loop().create_task(worker.abort(request_id)))
        # The prefill worker may still be sending KV: the lease ends when its call has.
        if prefill_done is None:
            lease.release()
        else:
            prefill_done.add_done_callback(lambda _: lease.release())


async def _first(responses, prefill_done: asyncio.Future, prefill: Instance) -> pb.GenerateResponse:
    """The decode stream's first message, unless the prefill call fails first (then a retry)."""
    nxt = asyncio.ensure_future(responses.__anext__())
    await asyncio.wait({nxt, prefill_done}, return_when=asyncio.FIRST_COMPLETED)
    error = prefill_done.result() if prefill_done.done() else None
    if not nxt.done() and error is not None:
        nxt.cancel()
        api_error = upstream_error("prefill", prefill.address, error.code(), error.details())
        if error.code() in RETRYABLE:
            raise _BeforeFirstToken(prefill, api_error)
        raise api_error
    return await nxt


def _raise_if_drained(*instances: Instance) -> None:
    """An abort because an instance drained past its deadline says so (the client may retry)."""
    for inst in instances:
        if inst.state == State.GONE and "deadline" in inst.reason:
            raise ApiError(
                503,
                f"{inst.role} instance {inst.id} ({inst.address}) was drained and its deadline passed; "
                "the request was ended there: retry it",
                "service_unavailable",
                "instance_drained",
            )


async def settle(timeout: float) -> None:
    """Waits (at most `timeout` seconds) for the aborts and prefill drains of ended requests."""
    if _background:
        await asyncio.wait(set(_background), timeout=timeout)


def _keep(task: asyncio.Future) -> asyncio.Future:
    _background.add(task)  # keep a reference until it has run
    task.add_done_callback(_background.discard)
    return task


async def _drain(call) -> grpc.aio.AioRpcError | None:
    """Read the prefill call to its end; its error, if it failed (cancellation is no failure)."""
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        return None if e.code() == grpc.StatusCode.CANCELLED else e
    except asyncio.CancelledError:
        pass
    return None
