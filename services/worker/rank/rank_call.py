"""A call handed to a rank, as the KV hand-off sees its caller: it may be cancelled (`Cancel` from the
DP controller), and whatever waits on it is woken then."""

from __future__ import annotations

import threading
from collections.abc import Callable


class RankCall:
    """A call handed to this rank, as the KV package sees its caller: it may be cancelled."""

    def __init__(self) -> None:
        self._cancelled = False
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def is_active(self) -> bool:
        return not self._cancelled

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(callback)
                return True
        callback()  # already cancelled: run it now
        return True

    def cancel(self) -> None:
        with self._lock:
            self._cancelled, callbacks, self._callbacks = True, self._callbacks, []
        for callback in callbacks:
            callback()
