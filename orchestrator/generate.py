"""One request through a (prefill, decode) pair: the same GenerateRequest goes to both, the
client sees the decode stream. If the request ends early (client gone, stop string, error) both
calls are cancelled and both workers get an Abort, so no KV stays behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from orchestrator.router import Router

REQUEST_TIMEOUT_S = 600.0
_background: set[asyncio.Task] = set()

# gRPC status from a worker -> (HTTP status, OpenAI error type)
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "service_unavailable"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


@dataclass(frozen=True)
class TokenEvent:
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class UpstreamError(RuntimeError):
    def __init__(self, status: int, type_: str, message: str):
        super().__init__(message)
        self.status, self.type = status, type_

    @classmethod
    def from_grpc(cls, side: str, address: str, err: grpc.aio.AioRpcError) -> UpstreamError:
        status, type_ = _HTTP.get(err.code(), (502, "upstream_error"))
        return cls(status, type_, f"{side} worker {address} failed ({err.code().name}): {err.details()}")


async def generate(
    router: Router, prompt_ids: list[int], sampling: pb.SamplingParams, request_id: str
) -> AsyncIterator[TokenEvent]:
    prefill, decode = router.pick()
    room = router.new_room()
    request = pb.GenerateRequest(
        request_id=request_id,
        tokenized=pb.TokenizedInput(input_ids=prompt_ids),
        sampling_params=sampling,
        disaggregated_params=pb.DisaggregatedParams(
            bootstrap_host=prefill.host, bootstrap_port=prefill.port, bootstrap_room=room
        ),
        stream=True,
    )
    prefill.inflight += 1
    decode.inflight += 1
    pcall = dcall = prefill_done = None
    finished = False
    try:
        pcall = prefill.stub.Generate(request, timeout=REQUEST_TIMEOUT_S)
        dcall = decode.stub.Generate(request, timeout=REQUEST_TIMEOUT_S)
        prefill_done = asyncio.ensure_future(_drain(pcall))
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
                    yield TokenEvent(
                        [], c.finish_reason, c.prompt_tokens, c.completion_tokens, c.cached_tokens
                    )
        except grpc.aio.AioRpcError as e:
            raise UpstreamError.from_grpc("decode", decode.address, e) from None
        if not finished:
            raise UpstreamError(
                502, "upstream_error", f"decode worker {decode.address} ended the stream early"
            )
    finally:
        if not finished:
            for call in (pcall, dcall):
                if call is not None:
                    call.cancel()
            # Belt and braces: the cancellations already abort on the workers.
            for worker in (prefill, decode):
                task = asyncio.get_running_loop().create_task(worker.abort(request_id))
                _background.add(task)  # keep a reference until it has run
                task.add_done_callback(_background.discard)
        if prefill_done is None:
            _leave(router, room, prefill, decode)
        else:
            prefill_done.add_done_callback(lambda _: _leave(router, room, prefill, decode))


async def _drain(call) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        async for _ in call:
            pass


def _leave(router: Router, room: int, prefill, decode) -> None:
    prefill.inflight -= 1
    decode.inflight -= 1
    router.end_room(room)
