"""A request's text events as its HTTP response: one JSON body, or a server-sent event stream.

Errors before the first event keep their HTTP status; after it the status is already sent, so
the stream reports them in an error event. Either way the stream ends with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send

from orchestrator.errors import ApiError
from orchestrator.http.admission import Admission, Slot
from orchestrator.http.detokenize import TextEvent
from orchestrator.http.envelopes import DONE, Envelope, error_event

T = TypeVar("T")
DONE_BYTES = DONE.encode()


class ClientGone(Exception):
    """The client disconnected while its request was being served."""


class Watch:
    """Notices the client leaving and cancels the task serving its request (then `ClientGone`).

    One waiting `receive()` per request, which returns only at the disconnect once the body has
    been read: no polling, and no task group around the stream (Starlette's costs a task and a
    cancel scope per request). `receive` None (no client connection, as in unit tests): no watch.
    """

    def __init__(self, receive: Receive | None):
        self.gone = False
        self._running: asyncio.Task[Any] | None = None
        """The task awaiting work in `run` (the one to cancel), if any."""
        self._watcher = asyncio.ensure_future(self._watch(receive)) if receive is not None else None

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self._running is not None:
            self._running.cancel()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """`work`'s result, or ClientGone as soon as the client disconnects (the work is cancelled)."""
        if self.gone:
            work.close()
            raise ClientGone
        self._running = task = asyncio.current_task()
        try:
            result = await work
        except asyncio.CancelledError:
            if not self.gone:
                raise
            task.uncancel()
            raise ClientGone from None
        finally:
            self._running = None
        if self.gone:  # left as the work ended, or the work turned the cancellation into its own answer
            if task.cancelling():
                task.uncancel()
            raise ClientGone
        return result

    def stop(self) -> None:
        """Stop watching (before the response's last message: a complete response reads as a disconnect)."""
        if self._watcher is not None:
            self._watcher.cancel()


class EventStream(StreamingResponse):
    """Server-sent events under the request's `Watch` (Starlette's own runs a task group per request)."""

    body_iterator: AsyncGenerator[str, None]
    """`content`: `sse_stream`'s generator (Starlette keeps an async iterable as it is)."""

    def __init__(
        self, content: AsyncGenerator[str, None], watch: Watch, finish: Callable[[], Awaitable[None]]
    ):
        super().__init__(content, media_type="text/event-stream", background=BackgroundTask(finish))
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            last = await self.watch.run(self._events(send))
        except ClientGone:
            pass  # the events' own `finally` ended the request on the workers
        else:
            self.watch.stop()  # a complete response reads as a disconnect to it
            await send({"type": "http.response.body", "body": last, "more_body": False})
        finally:
            self.watch.stop()
            await self.body_iterator.aclose()  # sse_stream: its `finally` runs now, not when collected
            if self.background is not None:
                await self.background()

    async def _events(self, send: Send) -> bytes:
        """Sends the body but its last piece (`[DONE]`), which goes out with the body's end."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for piece in self.body_iterator:
            body = piece if isinstance(piece, bytes) else piece.encode()
            if body.endswith(DONE_BYTES):
                return body
            await send({"type": "http.response.body", "body": body, "more_body": True})
        return b""


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
    the whole answer) ends it at once: its worker calls are cancelled and both workers abort it, no
    KV stays.
    """

    async def finish() -> None:
        # Idempotent; also runs when the client left before the stream body started (then
        # `sse_stream` never runs): closing the events cancels the worker calls and aborts.
        await events.aclose()
        slot.release()

    watch = Watch(request.receive if request is not None else None)
    try:
        first = await watch.run(admission.next(events))
        if first is None:
            raise ApiError(502, "the workers returned no output", "upstream_error")
    except ClientGone:
        await finish()
        return Response(status_code=499)  # nobody reads it: the client has gone
    except BaseException:
        watch.stop()
        await finish()
        raise
    if stream:
        return EventStream(sse_stream(envelope, first, events, admission, finish), watch, finish)
    try:
        return JSONResponse(await watch.run(collect(envelope, first, events, admission)))
    except ClientGone:
        return Response(status_code=499)
    finally:
        watch.stop()
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
) -> AsyncGenerator[str, None]:
    """The response as server-sent events; `finish` runs when the stream ends, however it ends.

    Events that are ready together go out as one piece (one write): the opening with the first
    text, the last text with the usage and `[DONE]`.
    """
    ready = ""
    try:
        ready = "".join(envelope.opening())
        ev: TextEvent | None = first
        last = first
        while ev is not None:
            last = ev
            if ev.text or ev.finish_reason or ev.logprobs:
                ready += envelope.chunk(ev)
            if ev.finish_reason is not None:
                break
            if ready:
                yield ready
                ready = ""
            ev = await admission.next(events)
        if envelope.stream_usage:
            ready += envelope.usage_chunk(last)
        yield ready + DONE
    except ApiError as e:
        yield ready + error_event(e) + DONE
    finally:
        await finish()
