"""Turning a request's engine outputs into the serialized Generate responses a rank replies with."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from services.engine.loop import EngineLoop, RequestStream
from services.kv import Caller
from services.worker import proto_convert


def stream_outputs(
    loop: EngineLoop,
    stream: RequestStream,
    request_id: str,
    caller: Caller,
    want_chunks: bool,
    abort: Callable[[str], bool],
    cached_tokens: Callable[[], int] = lambda: 0,
) -> Iterator[bytes]:
    """Yield chunks (when streaming) and the final GenerateComplete of `request_id`.

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
        if want_chunks and out.new_token_ids:
            yield proto_convert.chunk(out, cached_tokens()).SerializeToString()
        if out.finished:
            yield proto_convert.complete(out, cached_tokens()).SerializeToString()
            return
