"""The engine's own thread. gRPC handler threads never touch the engine directly: they `call`
into the loop, which runs commands between steps, and they read outputs from per-request
queues the loop fills. The loop does no network I/O and no logging per step."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from services.engine import Engine, RequestOutput

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.5
LOCKSTEP_IDLE_POLL_S = 0.02
"""An idle expert-parallel group re-checks for work this often (each check is a collective)."""


class EngineDead(RuntimeError):
    """The engine loop stopped (a step raised); the worker is out of service."""


class RequestStream:
    """Outputs of one request, filled by the loop and drained by one handler thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put(item)

    def get(self, timeout: float) -> RequestOutput | None:
        """Next output, or None after `timeout` seconds; raises if the engine died."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        return item


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._commands.put((lambda: None, Future()))
        self._thread.join(timeout=10)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run `fn(*args, **kwargs)` on the loop thread between steps; the future has its result."""
        fut: Future = Future()
        if not self.healthy:
            fut.set_exception(EngineDead(f"engine loop is down: {self.error!r}"))
            return fut
        self._commands.put((lambda: fn(*args, **kwargs), fut))
        if self.error is not None:  # the loop died between the check and the put
            self._fail_pending(EngineDead(f"engine loop is down: {self.error!r}"))
        return fut

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 30.0, **kwargs: Any) -> Any:
        """`call` and wait for the result; EngineDead if the loop is down or does not get to it in time.

        A command that timed out is cancelled before it starts, so it never runs behind the
        caller's back (e.g. reserving pages nobody will free).
        """
        fut = self.call(fn, *args, **kwargs)
        try:
            return fut.result(timeout=timeout)
        except TimeoutError:
            if fut.cancel():
                raise EngineDead(f"engine loop did not run a command within {timeout:.0f}s") from None
            return fut.result()  # it started just now: commands are short

    def attach_stream(self, request_id: str, stream: RequestStream) -> None:
        """Route `request_id`'s outputs to `stream` (call on the loop thread, e.g. inside `call`)."""
        self._streams[request_id] = stream

    def deliver(self, out: RequestOutput) -> None:
        """Hand an output produced outside `step` (e.g. by abort) to its stream; loop thread only."""
        stream = self._streams.get(out.request_id)
        if stream is not None:
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _run(self) -> None:
        try:
            while not self._stopping:
                if self.engine.lockstep:
                    # Every rank steps together: the step itself asks the group whether any rank has work.
                    self._drain(timeout=None)
                    for out in self.engine.step():
                        self.deliver(out)
                    if self.engine.idle:
                        self._drain(timeout=LOCKSTEP_IDLE_POLL_S)
                    continue
                self._drain(timeout=None if self.engine.has_unfinished() else IDLE_POLL_S)
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        self.deliver(out)
        except BaseException as e:  # the loop must report its death, whatever killed it
            self.error = e
            log.exception("engine loop died")
            dead = EngineDead(f"engine loop died: {e!r}")
            for stream in self._streams.values():
                stream.put(dead)
            self._streams.clear()
            self._fail_pending(dead)

    def _drain(self, timeout: float | None) -> None:
        """Run queued commands; wait up to `timeout` seconds for the first (None: do not wait)."""
        try:
            fn, fut = self._commands.get(timeout=timeout) if timeout else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:  # errors belong to the caller, not the loop
                    fut.set_exception(e)
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return

    def _fail_pending(self, error: BaseException) -> None:
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(error)
