"""The rank's prefix-cache event log that SubscribeKvEvents reads from a cursor."""

from services.worker.rank.kv_events import KvEventLog


def test_events_after_a_cursor_in_order_and_lost_ones_said():
    log = KvEventLog(capacity=4)
    assert log.since(0).events == () and not log.since(0).lost
    for i in range(3):
        log.add("stored", [i], 0)
    page = log.since(0)
    assert [e.hashes for e in page.events] == [(0,), (1,), (2,)] and page.next_seq == 3
    log.add("removed", [0], 0)
    page = log.since(page.next_seq)
    assert [(e.seq, e.kind) for e in page.events] == [(4, "removed")] and not page.lost
    assert log.since(4).events == () and log.since(4).next_seq == 4
    for i in range(5):  # the oldest fall out of the log: a reader at 4 missed event 5
        log.add("stored", [10 + i], 0)
    page = log.since(4)
    assert page.lost and [e.seq for e in page.events] == [6, 7, 8, 9] and page.next_seq == 9
