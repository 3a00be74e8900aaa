"""A request's text events as its HTTP response: one JSON body, or a server-sent event stream.

Errors before the first event keep their HTTP status; after it the status is already sent, so
the stream reports them in an error event. Either way the stream ends with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from orchestrator.admission import Admission, Slot
from orchestrator.envelopes import DONE, Envelope, error_event
from orchestrator.errors import ApiError
from orchestrator.text import TextEvent

DISCONNECT_POLL_S = 0.1
"""How often a request waiting for output checks that its client is still there."""


class ClientGone(Exception):
    """The client disconnected while its request waited for output."""


async def unless_gone(request: Request | None, work: Awaitable[Any]) -> Any:
    """`work`'s result, or ClientGone as soon as the client disconnects (the work is cancelled)."""
    if request is None:
        return await work
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone


async def respond(
    envelope: Envelope,
    stream: bool,
    events: AsyncGenerator[TextEvent, None],
    slot: Slot,
    admission: Admission,
    request: Request | None = None,
) -> Response:
    """Waits for the first event, then answers; the slot is released once the events are closed.

    A client that leaves while its request waits for output (its first token; or, not streaming,
    the whole answer) ends it at once: both worker calls are cancelled and aborted, no KV stays.
    """

    async def finish() -> None:
        # Idempotent; also runs when the client left before the stream body started (then
        # `sse_stream` never runs): closing the events cancels both worker calls and aborts.
        await events.aclose()
        slot.release()

    try:
        first = await unless_gone(request, admission.next(events))
        if first is None:
            raise ApiError(502, "the workers returned no output", "upstream_error")
    except ClientGone:
        await finish()
        return Response(status_code=499)  # nobody reads it: the client has gone
    except BaseException:
        await finish()
        raise
    if stream:
        return StreamingResponse(
            sse_stream(envelope, first, events, admission, finish),
            media_type="text/event-stream",
            background=BackgroundTask(finish),
        )
    try:
        return JSONResponse(await unless_gone(request, collect(envelope, first, events, admission)))
    except ClientGone:
        return Response(status_code=499)
    finally:
        await finish()


async def collect(
    envelope: Envelope, first: TextEvent, events: AsyncIterator[TextEvent], admission: Admission
) -> dict[str, Any]:
    """The whole response body, once the last event is in."""
    parts, logprobs, last = [first.text], list(first.logprobs), first
    while (ev := await admission.next(events)) is not None:
        parts.append(ev.text)
        logprobs += ev.logprobs
        last = ev
    return envelope.final("".join(parts), last, tuple(logprobs))


async def sse_stream(
    envelope: Envelope,
    first: TextEvent,
    events: AsyncIterator[TextEvent],
    admission: Admission,
    finish: Callable[[], Awaitable[None]],
) -> AsyncIterator[str]:
    """The response as server-sent events; `finish` runs when the stream ends, however it ends."""
    try:
        for line in envelope.opening():
            yield line
        ev: TextEvent | None = first
        last = first
        while ev is not None:
            last = ev
            if ev.text or ev.finish_reason or ev.logprobs:
                yield envelope.chunk(ev)
            if ev.finish_reason is not None:
                break
            ev = await admission.next(events)
        if envelope.stream_usage:
            yield envelope.usage_chunk(last)
        yield DONE
    except ApiError as e:
        yield error_event(e)
        yield DONE
    finally:
        await finish()
