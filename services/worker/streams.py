"""Turning a request's engine outputs into the Generate response stream."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from services.engine import InvalidRequestError
from services.worker import convert
from services.worker.engine_loop import EngineDead, EngineLoop, RequestStream

POLL_S = 0.1


def stream_outputs(
    loop: EngineLoop,
    stream: RequestStream,
    request_id: str,
    context: grpc.ServicerContext,
    want_chunks: bool,
    cached_tokens: int = 0,
) -> Iterator[pb.GenerateResponse]:
    """Yield chunks (when streaming) and the final GenerateComplete of `request_id`.

    If the caller goes away, the request is aborted so that its pages come back. The RPC's
    done-callback covers a cancel while this generator is parked at a `yield`, which gRPC never
    resumes; aborting a finished request is a no-op.
    """
    context.add_callback(lambda: loop.call(abort_and_deliver, loop, request_id))
    try:
        while True:
            out = stream.get(timeout=POLL_S)
            if out is None:
                if not context.is_active():
                    loop.call(abort_and_deliver, loop, request_id)
                    return
                continue
            if want_chunks and out.new_token_ids:
                yield convert.chunk(out, cached_tokens)
            if out.finished:
                yield convert.complete(out, cached_tokens)
                return
    except EngineDead as e:
        context.abort(grpc.StatusCode.UNAVAILABLE, f"worker engine is down: {e}")


def start_stream(loop: EngineLoop, start, context: grpc.ServicerContext) -> tuple[str, RequestStream]:
    """Run `start(stream) -> request_id` on the loop; map its errors to gRPC statuses."""
    stream = RequestStream()
    try:
        return loop.run(start, stream), stream
    except InvalidRequestError as e:
        context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
    except EngineDead as e:
        context.abort(grpc.StatusCode.UNAVAILABLE, f"worker engine is down: {e}")
    raise AssertionError("unreachable")  # context.abort raises


def abort_and_deliver(loop: EngineLoop, request_id: str) -> bool:
    """Loop thread: abort `request_id` and push the abort output to its stream."""
    out = loop.engine.abort(request_id)
    if out is None:
        return False
    loop.deliver(out)
    return True
