"""One request through a (prefill, decode) pair: the same GenerateRequest goes to both, the
client sees the decode stream. If the request ends early (client gone, stop string, error,
shutdown) both calls are cancelled and both workers get an Abort, so no KV stays behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from orchestrator.errors import ApiError, upstream_error
from orchestrator.registry import Instance, State
from orchestrator.router import NoWorkers, Router

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


async def generate(
    router: Router, prompt_ids: list[int], sampling: pb.SamplingParams, request_id: str
) -> AsyncIterator[TokenEvent]:
    """The decode worker's token stream; raises ApiError when no worker can take it or a worker fails."""
    try:
        lease = router.lease(request_id)
    except NoWorkers as e:
        raise ApiError(503, str(e), "service_unavailable") from None
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
    )
    pcall = dcall = prefill_done = None
    finished = False
    try:
        pcall = prefill.stub.Generate(request, timeout=REQUEST_TIMEOUT_S)
        dcall = decode.stub.Generate(request, timeout=REQUEST_TIMEOUT_S)
        prefill_done = _keep(asyncio.ensure_future(_drain(pcall)))
        try:
            async for resp in dcall:
                if resp.HasField("chunk"):
                    c = resp.chunk
                    yield TokenEvent(
                        list(c.token_ids), None, c.prompt_tokens, c.completion_tokens, c.cached_tokens
                    )
                else:
                    c = resp.complete
                    finished = True
                    if c.finish_reason == "abort":
                        _raise_if_drained(prefill, decode)
                    yield TokenEvent(
                        [], c.finish_reason, c.prompt_tokens, c.completion_tokens, c.cached_tokens
                    )
        except grpc.aio.AioRpcError as e:
            raise upstream_error("decode", decode.address, e.code(), e.details()) from None
        if not finished:
            raise ApiError(502, f"decode worker {decode.address} ended the stream early", "upstream_error")
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


async def _drain(call) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        async for _ in call:
            pass
