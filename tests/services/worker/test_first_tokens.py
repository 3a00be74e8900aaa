"""The FirstTokens feeds of a prefill instance: batching, a feed nobody holds, a feed taken over,
and the bound on what waits for a router that does not read."""

from __future__ import annotations

import threading

from services.worker.front import first_token_feeds as first_tokens
from services.worker.front.first_token_feeds import FirstTokenFeeds
from services.worker.messages import FirstToken


def token(room: int) -> FirstToken:
    return FirstToken(room, f"req-{room}", 100 + room, 16, 0)


def test_tokens_ready_together_go_in_one_batch_and_an_unknown_feed_gets_nothing():
    feeds = FirstTokenFeeds()
    feeds.publish("nobody", token(0))  # no subscriber: dropped (decode delivers it)
    feed = feeds.subscribe("router")
    for room in (1, 2, 3):
        feeds.publish("router", token(room))
    batches = feed.batches(lambda: True)
    assert [t.room for t in next(batches)] == [1, 2, 3]
    feeds.publish("router", token(4))
    assert [t.room for t in next(batches)] == [4]
    feeds.unsubscribe("router", feed)
    feeds.publish("router", token(5))
    assert feed.pending == []


def test_a_second_subscriber_takes_the_feed_and_ends_the_first_stream():
    feeds = FirstTokenFeeds()
    old = feeds.subscribe("router")
    ended = threading.Event()
    threading.Thread(target=lambda: (list(old.batches(lambda: True)), ended.set()), daemon=True).start()
    new = feeds.subscribe("router")
    assert ended.wait(5)
    feeds.unsubscribe("router", old)  # the old stream's cleanup leaves the new one in place
    feeds.publish("router", token(7))
    assert [t.room for t in next(new.batches(lambda: True))] == [7]


def test_a_router_that_does_not_read_holds_at_most_max_pending_tokens(monkeypatch):
    monkeypatch.setattr(first_tokens, "MAX_PENDING", 3)
    feeds = FirstTokenFeeds()
    feed = feeds.subscribe("router")
    for room in range(5):
        feeds.publish("router", token(room))
    assert [t.room for t in feed.pending] == [0, 1, 2] and feed.dropped == 2


def test_a_quiet_feed_ends_when_its_router_is_gone(monkeypatch):
    monkeypatch.setattr(first_tokens, "IDLE_CHECK_S", 0.01)
    feed = FirstTokenFeeds().subscribe("router")
    assert list(feed.batches(lambda: False)) == []
