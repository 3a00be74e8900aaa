"""Turning a request's engine outputs into the serialized Generate responses a rank replies with."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from types import TracebackType

from smg_grpc_proto import sglang_scheduler_pb2 as pb

from services.common.calls import Caller, CallError
from services.common.logs import REQUEST_ID, requests
from services.engine.loop import EngineLoop, RequestStream
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
    tokens go in the GenerateComplete alone (one message fewer, unless the first token is the last:
    decode sends that one as soon as the KV arrives).

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
    last = b""
    with RequestLog(request_id, role) as log:
        for last in responses:
            yield last
    if last and log.wanted:
        done = pb.GenerateResponse.FromString(last).complete
        log.done(done.finish_reason, done.prompt_tokens, done.completion_tokens, done.cached_tokens)


class RequestLog:
    """One request's stay on this worker: `request_id` on every record logged meanwhile, a line on
    `moeserve.requests` if it fails with a CallError, and (`done`) when it ends."""

    def __init__(self, request_id: str, role: str):
        self.request_id, self.role = request_id, role
        self.wanted = requests.isEnabledFor(logging.INFO)
        """Whether the end is logged at all (`--log-requests`)."""

    def __enter__(self) -> RequestLog:
        self._token = REQUEST_ID.set(self.request_id or None)
        self._start = time.monotonic()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(error, CallError):  # logged while the request's id is still in the context
            requests.info(
                "request %s on %s failed: %s %s", self.request_id, self.role, error.code, error.message
            )
        REQUEST_ID.reset(self._token)

    def done(
        self, finish_reason: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int
    ) -> None:
        if not self.wanted:
            return
        fields = {
            "role": self.role,
            "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cached_tokens": cached_tokens,
            "seconds": round(time.monotonic() - self._start, 6),
        }
        requests.info(
            "request %s on %s: %s after %d prompt + %d completion tokens, %.3f s", self.request_id,
            self.role, finish_reason, prompt_tokens, completion_tokens, fields["seconds"],
            extra={"request_id": self.request_id, "fields": fields},
        )  # fmt: skip
