"""Turning a request's engine outputs into the serialized Generate responses a rank replies with."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from smg_grpc_proto import sglang_scheduler_pb2 as pb

from services.engine.loop import EngineLoop, RequestStream
from services.kv import Caller, HandoffError
from services.logs import REQUEST_ID, requests
from services.worker import proto_convert


def stream_outputs(
    loop: EngineLoop,
    stream: RequestStream,
    request_id: str,
    caller: Caller,
    want_chunks: bool,
    abort: Callable[[str], bool],
    cached_tokens: Callable[[], int] | None = None,
    last_in_complete: bool = False,
) -> Iterator[bytes]:
    """Yield chunks (when streaming) and the final GenerateComplete of `request_id`.

    `last_in_complete` (decode-first, whose router reads them from `output_ids`): the last step's
    tokens go in the GenerateComplete alone, one message fewer per request.

    If the caller goes away, `abort(request_id)` runs on the loop (so the pages come back) and the
    reader is woken; aborting a finished request is a no-op. Engine errors and hand-off failures
    raise out of here with their status.
    """

    def gone() -> None:
        loop.call(abort, request_id)
        stream.wake()

    caller.add_callback(gone)
    while True:
        out = stream.get()
        if out is None:
            if not caller.is_active():
                return
            continue
        cached = cached_tokens() if cached_tokens is not None else None  # None: the output's own
        if want_chunks and out.new_token_ids and not (last_in_complete and out.finished):
            yield proto_convert.chunk(out, cached).SerializeToString()
        if out.finished:
            yield proto_convert.complete(out, cached).SerializeToString()
            return


def logged(request_id: str, role: str, responses: Iterator[bytes]) -> Iterator[bytes]:
    """`responses` of one Generate, with `request_id` on every record logged meanwhile, and one
    line on `moeserve.requests` when it ends (`--log-requests`)."""
    token = REQUEST_ID.set(request_id or None)
    start, last = time.monotonic(), b""
    try:
        for last in responses:
            yield last
    except HandoffError as e:
        requests.info("request %s on %s failed: %s %s", request_id, role, e.code, e.message)
        raise
    finally:
        REQUEST_ID.reset(token)
    if requests.isEnabledFor(logging.INFO) and last:
        done = pb.GenerateResponse.FromString(last).complete
        fields = {
            "role": role,
            "finish_reason": done.finish_reason,
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "cached_tokens": done.cached_tokens,
            "seconds": round(time.monotonic() - start, 6),
        }
        requests.info(
            "request %s on %s: %s after %d prompt + %d completion tokens, %.3f s", request_id, role,
            done.finish_reason, done.prompt_tokens, done.completion_tokens, fields["seconds"],
            extra={"request_id": request_id, "fields": fields},
        )  # fmt: skip
