"""One attempt of a request on a (prefill, decode) pair; the client sees the decode stream.

The pair's mode sends the request (`decode_first`: to decode alone, which forwards it to prefill;
`dual`: to both, SGLang's way) and may race decode's first message with something sooner
(`first_token_race`). This module reads what comes back into token events. A failure says which
instance to blame (`failures`); if the request ends early (client gone, stop string, error,
shutdown) the calls are cancelled and both workers get an Abort, so no KV stays behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol, cast

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from orchestrator.dispatch import background, first_token_race
from orchestrator.dispatch.decode_first import DecodeFirst
from orchestrator.dispatch.dual import Dual
from orchestrator.dispatch.failures import RETRYABLE, BeforeFirstToken, MidStream
from orchestrator.dispatch.router import Lease
from orchestrator.errors import ApiError, upstream_error
from orchestrator.events import TokenEvent, TokenLogprob, logprobs_from_proto
from orchestrator.fleet.registry import Instance, State
from services.common import wire

REQUEST_TIMEOUT_S = 600.0


class Mode(Protocol):
    """How an attempt's calls are made (`DecodeFirst`, `Dual`)."""

    rival: asyncio.Future[Any] | None
    """What may end before decode's first message (`first_token_race`)."""
    skips_ahead: bool
    """Decode's stream may repeat tokens that went out ahead (drop them by position)."""
    tail_in_complete: bool
    """The last step's tokens come in the GenerateComplete alone."""

    def open(self, timeout: float) -> AsyncIterator[pb.GenerateResponse]:
        """Make the calls; decode's stream."""

    def rival_first(self, result: Any) -> TokenEvent | None:
        """The rival ended first with `result`: an event for the client, or None (it may raise)."""

    def decode_answered(self) -> None:
        """Decode's first message came."""

    def close(self, finished: bool) -> None:
        """The attempt ended (`finished`: decode completed it): cancel what runs, end the lease."""


async def attempt(
    lease: Lease, prompt_ids: list[int], sampling: pb.SamplingParams, request_id: str, logprobs: int | None
) -> AsyncIterator[TokenEvent]:
    """The request's token events from the lease's pair; raises `BeforeFirstToken` or `MidStream` when
    an instance fails (whose breaker then counts it), an ApiError when the request itself is refused."""
    request = _request(lease, prompt_ids, sampling, request_id, logprobs)
    mode: Mode = (
        DecodeFirst(lease, request, ahead=logprobs is None) if lease.decode_first else Dual(lease, request)
    )
    reading = _Reading(lease, mode)
    try:
        async for event in reading.events():
            yield event
    finally:
        mode.close(reading.finished)
        if not reading.finished:  # belt and braces: the cancelled calls already abort on the workers
            for worker in (lease.prefill, lease.decode):
                background.keep(asyncio.get_running_loop().create_task(worker.abort(request_id)))


def _request(
    lease: Lease, prompt_ids: list[int], sampling: pb.SamplingParams, request_id: str, logprobs: int | None
) -> pb.GenerateRequest:
    host, port = lease.prefill.bootstrap
    return pb.GenerateRequest(
        request_id=request_id,
        tokenized=pb.TokenizedInput(input_ids=prompt_ids),
        sampling_params=sampling,
        disaggregated_params=pb.DisaggregatedParams(
            bootstrap_host=host, bootstrap_port=port, bootstrap_room=lease.room
        ),
        stream=True,
        return_logprob=logprobs is not None,
        top_logprobs_num=logprobs or 0,
        logprob_start_len=-1,
    )


class _Reading:
    """Decode's stream (and what came ahead of it) as token events."""

    def __init__(self, lease: Lease, mode: Mode):
        self.lease, self.mode = lease, mode
        self.started = False
        """The client has had something of this attempt (a failure now is mid-stream)."""
        self.finished = False
        self.streamed = 0
        """Tokens the client has had from this attempt."""

    async def events(self) -> AsyncIterator[TokenEvent]:
        prefill, decode = self.lease.prefill, self.lease.decode
        heard = False
        try:
            messages = first_token_race.responses(self.mode.open(REQUEST_TIMEOUT_S), self.mode.rival)
            async with contextlib.aclosing(messages):  # its read of decode ends with the attempt
                async for message in messages:
                    if isinstance(message, first_token_race.RivalFirst):
                        ahead = self.mode.rival_first(message.result)
                        if ahead is not None:
                            self.started, self.streamed = True, len(ahead.token_ids)
                            yield ahead
                        continue
                    if not heard:  # both instances did their part
                        self.started = heard = True
                        self.mode.decode_answered()
                        prefill.breaker.success()
                        decode.breaker.success()
                    if message.HasField("chunk"):
                        event = self._chunk(message.chunk)
                        if event is not None:
                            yield event
                    else:
                        self.finished = True
                        yield self._complete(message.complete)
        except grpc.aio.AioRpcError as e:
            # Decode-first: a failure of the prefill (or of the way to it) comes back through decode.
            # the failed-peer value is text: only "-bin" keys carry bytes
            trailing = cast("Iterable[tuple[str, str]] | None", e.trailing_metadata())
            blame = prefill if wire.failed_peer(trailing) == "prefill" else decode
            error = upstream_error(blame.role, blame.address, e.code(), e.details())
            if e.code() in RETRYABLE:
                raise (MidStream if self.started else BeforeFirstToken)(blame, error) from None
            raise error from None
        if not self.finished:
            error = ApiError(502, f"decode worker {decode.address} ended the stream early", "upstream_error")
            raise (MidStream if self.started else BeforeFirstToken)(decode, error)

    def _chunk(self, c: pb.GenerateStreamChunk) -> TokenEvent | None:
        """The chunk's tokens the client has not had (one may have gone out ahead, from prefill)."""
        seen = 0
        if self.mode.skips_ahead:
            seen = max(0, self.streamed - (c.completion_tokens - len(c.token_ids)))
            if seen >= len(c.token_ids):
                return None
        self.streamed += len(c.token_ids) - seen
        lps = logprobs_from_proto(c.output_logprobs)[seen:] if c.HasField("output_logprobs") else ()
        return TokenEvent(
            list(c.token_ids)[seen:], None, c.prompt_tokens, c.completion_tokens, c.cached_tokens, lps
        )

    def _complete(self, c: pb.GenerateComplete) -> TokenEvent:
        if c.finish_reason == "abort":
            _raise_if_drained(self.lease.prefill, self.lease.decode)
        tail: list[int] = []
        lps: tuple[TokenLogprob, ...] = ()
        if self.mode.tail_in_complete:  # the last step's tokens come in the complete alone
            tail = list(c.output_ids[self.streamed :])
            if c.HasField("output_logprobs"):
                lps = logprobs_from_proto(c.output_logprobs)[self.streamed :]
        return TokenEvent(tail, c.finish_reason, c.prompt_tokens, c.completion_tokens, c.cached_tokens, lps)


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
