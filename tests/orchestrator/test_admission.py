"""Admission: slots (429 when full, each given back once), and the stop that ends requests in flight."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.errors import ApiError
from orchestrator.http.admission import Admission
from tests.orchestrator.conftest import TokenSource


def test_full_admission_answers_429_with_retry_after():
    admission = Admission(2)
    admission.admit()
    admission.admit()
    with pytest.raises(ApiError) as e:
        admission.admit()
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}
    assert e.value.type == "rate_limit_error" and "over 2 requests" in str(e.value)
    assert admission.in_flight == 2


def test_a_slot_is_given_back_exactly_once():
    admission = Admission(1)
    slot = admission.admit()
    slot.release()
    slot.release()
    assert admission.in_flight == 0
    admission.admit()
    with pytest.raises(ApiError):  # a second release would have made room for two
        admission.admit()


def test_after_close_nothing_is_admitted():
    admission = Admission(4)
    admission.close()
    with pytest.raises(ApiError) as e:
        admission.admit()
    assert e.value.status == 503 and e.value.code == "server_shutting_down"
    assert e.value.body()["error"]["type"] == "service_unavailable"


def test_next_yields_items_then_none():
    async def main():
        admission = Admission(1)
        source = TokenSource([1, 2])  # any async iterator
        events = source.stream()
        return [await admission.next(events) for _ in range(3)]

    assert asyncio.run(main()) == [1, 2, None]


def test_close_ends_a_wait_for_the_next_event_and_cancels_its_stream():
    async def main():
        admission = Admission(1)
        source = TokenSource([], hang=True)
        events = source.stream()
        waiting = asyncio.create_task(admission.next(events))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        admission.close()
        with pytest.raises(ApiError) as e:
            await asyncio.wait_for(waiting, 1.0)
        assert e.value.status == 503 and "shutting down" in str(e.value)
        assert source.closed  # the stream was cancelled, which cancels the worker calls
        assert not asyncio.current_task().cancelling()

    asyncio.run(main())


def test_cancelling_the_waiter_is_not_mistaken_for_a_stop():
    async def main():
        admission = Admission(1)
        source = TokenSource([], hang=True)
        waiting = asyncio.create_task(admission.next(source.stream()))
        await asyncio.sleep(0.01)
        waiting.cancel()  # e.g. the client went away
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert source.closed and not admission.closing

    asyncio.run(main())
