"""A rank's prefix-cache events, numbered, for SGLang's `SubscribeKvEvents` stream.

The engine thread appends ("stored" or "removed", block hashes, parent hash); rank 0's servicer
reads each rank's log from a cursor (`since`) and streams `KvEventBatch`es per DP rank. The log
keeps the last `capacity` events: a subscriber that falls further behind gets told so (`lost`)
and sends `KvCacheCleared` for that rank before going on, so its view is never wrong, only
incomplete until new events arrive.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque

from services.worker.messages import KvEvent, KvEventPage

CAPACITY = 65536


class KvEventLog:
    def __init__(self, capacity: int = CAPACITY):
        self._events: deque[KvEvent] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, kind: str, hashes: list[int], parent: int) -> None:
        """The prefix cache's event hook (engine thread)."""
        with self._lock:
            self._events.append(KvEvent(next(self._seq), kind, tuple(hashes), parent))

    def since(self, seq: int) -> KvEventPage:
        """Events numbered above `seq` (0: from the start of the log)."""
        newer: list[KvEvent] = []
        with self._lock:
            for e in reversed(self._events):  # from the newest: only what is new is read
                if e.seq <= seq:
                    break
                newer.append(e)
            oldest = self._events[0].seq if self._events else None
            last = self._events[-1].seq if self._events else seq
        events = tuple(reversed(newer))
        lost = seq > 0 and oldest is not None and oldest > seq + 1
        return KvEventPage(events, max(seq, last), lost)
