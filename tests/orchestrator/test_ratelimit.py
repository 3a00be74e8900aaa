"""Per-key token rate limits: buckets per key, prompt taken at admission, output when a request ends."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.config import ApiConfig
from orchestrator.errors import ApiError
from orchestrator.events import TokenEvent
from orchestrator.fleet.membership import create as create_membership
from orchestrator.fleet.registry import Registry
from orchestrator.http.app import create_app
from orchestrator.http.ratelimit import TokenBuckets, charged
from tests.orchestrator.test_api import CHAT, call


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_key_has_its_own_bucket_that_refills():
    clock = Clock()
    buckets = TokenBuckets(rate=10, burst=100, clock=clock)
    buckets.admit("a", 80)
    with pytest.raises(ApiError) as e:
        buckets.admit("a", 30)  # 20 left, 30 wanted: 1 s at 10 tokens/s
    assert (
        e.value.status == 429 and e.value.headers == {"Retry-After": "1"} and "retry in 1 s" in str(e.value)
    )
    buckets.admit("b", 100)  # another key is not affected
    clock.now = 1.0
    buckets.admit("a", 30)
    buckets.charge("a", 50)  # what it generated: the bucket goes into debt
    clock.now = 2.0
    with pytest.raises(ApiError, match="retry in 6 s"):
        buckets.admit("a", 20)  # -50 + 10 = -40 now: 60 short of 20 tokens, 6 s at 10 tokens/s
    clock.now = 100.0
    buckets.admit("a", 500)  # larger than the burst: a full bucket lets it in (and goes into debt)


def test_generated_tokens_are_charged_when_the_stream_ends_however_it_ends():
    buckets = TokenBuckets(rate=1, burst=1000, clock=Clock())

    async def tokens():
        for n in (1, 2, 3):
            yield TokenEvent([n], None, 5, n)

    async def scenario() -> None:
        stream = charged(tokens(), buckets, "k")
        async for event in stream:
            if event.completion_tokens == 2:
                break  # the client left after two tokens
        await stream.aclose()

    asyncio.run(scenario())
    assert buckets._level["k"][0] == 998


def test_the_api_refuses_a_key_over_its_rate_with_429(ds_dir):
    config = ApiConfig(ds_dir, "tiny", frozenset({"k1", "k2"}), key_token_rate=0.1, key_token_burst=1)
    registry = Registry()
    membership = create_membership("static", registry, prefill=["127.0.0.1:1"], decode=["127.0.0.1:2"])
    app = create_app(config, registry, membership)
    first = call(app, "POST", "/v1/chat/completions", headers={"Authorization": "Bearer k1"}, json=CHAT)
    assert first.status_code == 503  # let in (no worker is ready here): its prompt was taken
    second = call(app, "POST", "/v1/chat/completions", headers={"Authorization": "Bearer k1"}, json=CHAT)
    assert second.status_code == 429 and int(second.headers["Retry-After"]) > 1
    assert second.json()["error"]["code"] == "token_rate_exceeded" and "k1" not in second.text
    other = call(app, "POST", "/v1/chat/completions", headers={"Authorization": "Bearer k2"}, json=CHAT)
    assert other.status_code == 503  # another key still gets in
