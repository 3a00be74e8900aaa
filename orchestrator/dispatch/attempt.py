"""One attempt of a request on a (prefill, decode) pair; the client sees the decode stream.

Decode-first (moeserve workers, `services.common.decode_first`): the GenerateRequest goes to decode
alone, which forwards it to prefill in its KV Attach, so this holds one stream per request; the
last tokens come in the GenerateComplete (one message fewer). Dual dispatch (SGLang workers): the
same request goes to both. A failure says which instance to blame (`InstanceFailed`); if the
request ends early (client gone, stop string, error, shutdown) the calls are cancelled and both
workers get an Abort, so no KV stays behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from orchestrator import metrics
from orchestrator.dispatch.router import Lease
from orchestrator.errors import ApiError, upstream_error
from orchestrator.fleet import first_token_stream as first_tokens
from orchestrator.fleet.registry import Instance, State
from orchestrator.http.logprobs import TokenLogprob, from_proto
from services.common import decode_first

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


class InstanceFailed(Exception):
    """An attempt failed because of `blame` (not the request): try elsewhere."""

    def __init__(self, blame: Instance, error: ApiError):
        self.blame, self.error = blame, error

    def charge(self, avoid: set[str]) -> None:
        """Count it against the instance's breaker and keep the request away from it."""
        self.blame.breaker.failure()
        avoid.add(self.blame.id)


class BeforeFirstToken(InstanceFailed):
    """Before the client saw anything: retry on a fresh pair."""


class MidStream(InstanceFailed):
    """An instance failed after tokens went out (the decode, or a prefill whose hand-off failed after
    its first token went ahead): migrate what is left to a fresh pair."""


async def attempt(
    lease: Lease, prompt_ids: list[int], sampling: pb.SamplingParams, request_id: str, logprobs: int | None
) -> AsyncIterator[TokenEvent]:
    """The request's token events from the lease's pair; raises `BeforeFirstToken` or `MidStream` when
    an instance fails (whose breaker then counts it), an ApiError when the request itself is refused."""
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
    pcall = dcall = prefill_done = ahead = pending = None
    finished = started = heard = False
    single = lease.decode_first
    streamed = 0  # tokens the client has had from this attempt
    try:
        if single:  # one stream: decode forwards the request to prefill
            ahead = prefill.first_tokens.expect(lease.room) if logprobs is None else None
            feed = first_tokens.FEED_ID if ahead is not None else ""
            forward = decode_first.forward_metadata(lease.prefill_rank, feed)
            dcall = decode.stub.Generate(request, timeout=REQUEST_TIMEOUT_S, metadata=forward)
        else:  # SGLang's dual dispatch
            pcall = prefill.stub.Generate(_pinned(request, lease.prefill_rank), timeout=REQUEST_TIMEOUT_S)
            dcall = decode.stub.Generate(request, timeout=REQUEST_TIMEOUT_S)
            prefill_done = _keep(asyncio.ensure_future(_drain(pcall)))
        responses = dcall.__aiter__()
        rival = ahead if ahead is not None else prefill_done  # what decode's first message races
        try:
            while True:
                if pending is not None:  # decode's first message, read while prefill's token went out
                    resp, pending = await pending, None
                elif started or rival is None:
                    resp = await responses.__anext__()
                else:
                    pending = asyncio.ensure_future(responses.__anext__())
                    await asyncio.wait({pending, rival}, return_when=asyncio.FIRST_COMPLETED)
                    if not pending.done() and rival is ahead:  # prefill's first token is sooner
                        token = ahead.result()
                        started, streamed = True, 1
                        metrics.FIRST_TOKENS.labels("prefill").inc()
                        yield TokenEvent([token.token_id], None, token.prompt_tokens, 1, token.cached_tokens)
                        continue
                    if not pending.done():  # dual dispatch: a failed prefill ends the attempt at once
                        _raise_if_failed(rival.result(), prefill)
                    resp, pending = await pending, None
                    if rival is ahead:
                        metrics.FIRST_TOKENS.labels("decode").inc()
                if not heard:  # both instances did their part
                    started = heard = True
                    prefill.breaker.success()
                    decode.breaker.success()
                if resp.HasField("chunk"):
                    c = resp.chunk
                    seen = 0
                    if ahead is not None:  # the first token may have gone out ahead, from prefill
                        seen = max(0, streamed - (c.completion_tokens - len(c.token_ids)))
                        if seen >= len(c.token_ids):
                            continue
                    streamed += len(c.token_ids) - seen
                    lps = from_proto(c.output_logprobs)[seen:] if c.HasField("output_logprobs") else ()
                    yield TokenEvent(
                        list(c.token_ids)[seen:],
                        None,
                        c.prompt_tokens,
                        c.completion_tokens,
                        c.cached_tokens,
                        lps,
                    )
                else:
                    c = resp.complete
                    finished = True
                    if c.finish_reason == "abort":
                        _raise_if_drained(prefill, decode)
                    tail, lps = [], ()
                    if single:  # decode-first: the last step's tokens come in the complete alone
                        tail = list(c.output_ids[streamed:])
                        if c.HasField("output_logprobs"):
                            lps = from_proto(c.output_logprobs)[streamed:]
                    yield TokenEvent(
                        tail, c.finish_reason, c.prompt_tokens, c.completion_tokens, c.cached_tokens, lps
                    )
        except StopAsyncIteration:
            pass
        except grpc.aio.AioRpcError as e:
            # Decode-first: a failure of the prefill (or of the way to it) comes back through decode.
            blame = prefill if decode_first.failed_peer(e.trailing_metadata()) == "prefill" else decode
            error = upstream_error(blame.role, blame.address, e.code(), e.details())
            if e.code() in RETRYABLE:
                raise (MidStream if started else BeforeFirstToken)(blame, error) from None
            raise error from None
        if not finished:
            error = ApiError(502, f"decode worker {decode.address} ended the stream early", "upstream_error")
            raise (MidStream if started else BeforeFirstToken)(decode, error)
    finally:
        if ahead is not None:
            prefill.first_tokens.forget(lease.room)
        _settle(pending)
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


def _pinned(request: pb.GenerateRequest, rank: int | None) -> pb.GenerateRequest:
    """The request for prefill: pinned to the DP rank whose cache holds the prefix, if one was chosen
    (decode picks its own rank)."""
    if rank is None:
        return request
    pinned = pb.GenerateRequest()
    pinned.CopyFrom(request)
    pinned.data_parallel_rank = rank
    return pinned


def _settle(read: asyncio.Future | None) -> None:
    """A read of the decode stream the attempt no longer waits for: stop it, or take its error."""
    if read is None:
        return
    if not read.done():
        read.cancel()
    elif not read.cancelled():
        read.exception()


def _raise_if_failed(error: grpc.aio.AioRpcError | None, prefill: Instance) -> None:
    """Dual dispatch: the prefill call ended before decode's first message; a failure ends the try."""
    if error is None:
        return
    api_error = upstream_error("prefill", prefill.address, error.code(), error.details())
    if error.code() in RETRYABLE:
        raise BeforeFirstToken(prefill, api_error)
    raise api_error


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
