"""The engine's own thread. Other threads never touch the engine directly: they `call` into the
loop, which runs commands between steps, and read outputs from per-request streams the loop
fills. Timers (`call_later`) run between steps too. The loop does no network I/O and no logging
per step; in an expert-parallel group the engine decides when to step and when to stop together.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from services.engine.engine import Engine
from services.engine.request import RequestOutput
from services.models.device import use_in_thread

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    """The engine loop stopped (a step raised, or the worker is shutting down)."""


class RequestStream:
    """Outputs of one request, filled by the loop and drained by one reader thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[RequestOutput | BaseException | None] = queue.SimpleQueue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put(item)

    def wake(self) -> None:
        """Make a blocked `get` return None (its reader went away)."""
        self._queue.put(None)

    def get(self) -> RequestOutput | None:
        """Next output, or None after `wake`; raises the error the request ended with."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class EngineLoop:
    """Runs `engine.step()` on a thread of its own; everything else reaches the engine through it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, Callable[[], Any]]] = []
        self._timer_ids = itertools.count()
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self._stop_callbacks: list[Callable[[BaseException], Any]] = []
        self.error: BaseException | None = None
        """Why the loop is down: EngineDead after a clean stop, the exception that killed it otherwise."""
        self.crashed = False
        """The loop died of an error (not a requested stop)."""
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current step (in a group: at the same step as every rank) and wait for it."""
        self._stopping = True
        self._commands.put((lambda: None, Future()))
        self._thread.join(timeout=timeout)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """Run `fn(*args, **kwargs)` on the loop thread between steps; the future has its result."""
        fut: Future[Any] = Future()
        if not self.healthy:
            fut.set_exception(EngineDead(f"engine loop is down: {self.error!r}"))
            return fut
        self._commands.put((lambda: fn(*args, **kwargs), fut))
        if self.error is not None:  # the loop ended between the check and the put
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

    def add_stop_callback(self, callback: Callable[[BaseException], Any]) -> None:
        """Run `callback(error)` on the loop thread when the loop ends (stopped or died)."""
        self._stop_callbacks.append(callback)

    def call_later(self, delay: float, fn: Callable[[], Any]) -> None:
        """Run `fn()` on the loop thread, between steps, `delay` seconds from now (loop thread only)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_ids), fn))

    def attach_stream(self, request_id: str, stream: RequestStream) -> None:
        """Route `request_id`'s outputs to `stream` (loop thread only, e.g. inside `call`)."""
        self._streams[request_id] = stream

    def deliver(self, out: RequestOutput) -> None:
        """Hand an output produced outside `step` (e.g. by abort) to its stream; loop thread only."""
        stream = self._streams.get(out.request_id)
        if stream is not None:
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def fail(self, request_id: str, error: BaseException) -> bool:
        """Abort `request_id` and end its stream with `error` instead of an output; loop thread only."""
        found = self.engine.abort(request_id) is not None
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(error)
        return found

    def abort(self, request_id: str) -> bool:
        """Abort `request_id` and push the abort output to its stream; loop thread only."""
        out = self.engine.abort(request_id)
        if out is None:
            return False
        self.deliver(out)
        return True

    def _run(self) -> None:
        try:
            use_in_thread(self.engine.runner.device)  # its kernels and events go to the rank's GPU
            while True:
                self._drain(self._wait_s())
                self._fire_timers()
                if self.engine.must_step():
                    for out in self.engine.step(stop=self._stopping):
                        self.deliver(out)
                    if self.engine.stopped:
                        break
                elif self._stopping:
                    break
            error: BaseException = EngineDead("the worker is shutting down")
        except BaseException as e:  # the loop must report its death, whatever killed it
            self.error = error = e
            self.crashed = True
            log.exception("engine loop died")
        dead = error if isinstance(error, EngineDead) else EngineDead(f"engine loop died: {error!r}")
        if self.error is None:
            self.error = dead
        for stream in self._streams.values():
            stream.put(dead)
        self._streams.clear()
        self._fail_pending(dead)
        for callback in self._stop_callbacks:
            try:
                callback(dead)
            except Exception:
                log.exception("engine loop stop callback failed")

    def _wait_s(self) -> float | None:
        wait = 0.0 if self._stopping else self.engine.idle_wait()
        if self._timers:
            due = max(0.0, self._timers[0][0] - time.monotonic())
            wait = due if wait is None else min(wait, due)
        return wait

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception:  # a timer's error belongs to its owner, never the loop
                log.exception("engine loop timer failed")

    def _drain(self, timeout: float | None) -> None:
        """Run queued commands; wait up to `timeout` seconds for the first (0: do not wait)."""
        try:
            if timeout == 0:
                fn, fut = self._commands.get_nowait()
            else:
                fn, fut = self._commands.get(timeout=timeout)
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
