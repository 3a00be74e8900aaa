"""The FirstTokens feeds of a prefill instance (rank 0): each router subscribed here gets the first
token of every decode-first request that names its feed as soon as the prefill rank has sampled it,
before the KV is sent to decode. Batched: whatever is ready when the stream can send goes in one
message. A token nobody takes is dropped; decode delivers it anyway, a hop and a transfer later."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

from services.worker import messages as msg

log = logging.getLogger(__name__)
MAX_PENDING = 4096
"""Tokens kept for a router that does not read its feed; beyond that they are dropped (decode
delivers them)."""
IDLE_CHECK_S = 1.0
"""How often a quiet feed checks that its router is still there."""


class Feed:
    """One router's feed: tokens waiting to be sent on its stream."""

    def __init__(self, feed_id: str = "") -> None:
        self.feed_id = feed_id
        self.pending: list[msg.FirstToken] = []
        self.dropped = 0
        self.closed = False
        self.changed = threading.Condition()

    def put(self, token: msg.FirstToken) -> None:
        with self.changed:
            if len(self.pending) >= MAX_PENDING:
                if not self.dropped:
                    log.warning(
                        "first-token feed %s is not read; its tokens go with decode only", self.feed_id
                    )
                self.dropped += 1
                return
            self.pending.append(token)
            self.changed.notify()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify()

    def batches(self, active: Callable[[], bool]) -> Iterator[list[msg.FirstToken]]:
        """Everything pending, each time there is some, until closed or the router has gone."""
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.pending or self.closed, timeout=IDLE_CHECK_S)
                if self.closed:
                    return
                batch, self.pending = self.pending, []
            if batch:
                yield batch
            elif not active():
                return


class FirstTokenFeeds:
    """The routers' feeds on this instance, by feed id."""

    def __init__(self) -> None:
        self._feeds: dict[str, Feed] = {}
        self._lock = threading.Lock()

    def publish(self, feed_id: str, token: msg.FirstToken) -> None:
        with self._lock:
            feed = self._feeds.get(feed_id)
        if feed is not None:
            feed.put(token)

    def subscribe(self, feed_id: str) -> Feed:
        """A new feed under `feed_id`; one that was there (a router's earlier stream) is closed."""
        feed = Feed(feed_id)
        with self._lock:
            old, self._feeds[feed_id] = self._feeds.get(feed_id), feed
        if old is not None:
            old.close()
        return feed

    def unsubscribe(self, feed_id: str, feed: Feed) -> None:
        with self._lock:
            if self._feeds.get(feed_id) is feed:
                del self._feeds[feed_id]
