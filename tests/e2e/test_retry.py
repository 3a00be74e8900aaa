"""Retries before the first token and the circuit breaker, with real workers: a prefill instance
that refuses its first requests (its fault-injection switch) is avoided, no client sees an error,
its breaker opens and, once it serves again, closes."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.cluster import LocalCluster
from tests.oracle import encode, greedy

REFUSALS = 5


@pytest.fixture(scope="module")
def flaky(ds_dir):
    c = LocalCluster()
    try:
        bad = c.worker(
            "prefill-bad", "prefill", ds_dir, env={"MOESERVE_FAULT_REFUSE_GENERATE": str(REFUSALS)}
        )
        good = c.worker("prefill-good", "prefill", ds_dir)
        decode = c.worker("decode", "decode", ds_dir)
        yield c, c.orchestrator(ds_dir, [bad, good], [decode], "--breaker-cooldown", "1"), bad
    finally:
        c.stop()


def breaker_of(url: str, address: str) -> dict:
    data = httpx.get(f"{url}/admin/instances", timeout=5).json()["data"]
    return next(i for i in data if i["address"] == address)


def test_a_refusing_prefill_is_retried_around_then_its_breaker_opens_and_closes(flaky, ds_dir):
    _, url, bad = flaky
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    expected = greedy(ds_dir, encode(ds_dir, "retry me"), 6)
    seen_open = False
    deadline = time.monotonic() + 60
    answers = 0
    while time.monotonic() < deadline:
        res = client.completions.create(model="deepseek_v3", prompt="retry me", max_tokens=6, temperature=0)
        assert (res.choices[0].text, res.choices[0].finish_reason) == expected  # never an error
        answers += 1
        state = breaker_of(url, bad)
        seen_open = seen_open or state["breaker"] != "closed"
        if seen_open and state["breaker"] == "closed" and state["breaker_opened"] >= 1:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the breaker did not open and close again: {breaker_of(url, bad)}")
    assert seen_open and answers >= REFUSALS
    # Closed again means it served: its refusals are used up and it takes its share.
    before = breaker_of(url, bad)["served"]
    for _ in range(4):
        client.completions.create(model="deepseek_v3", prompt="retry me", max_tokens=2, temperature=0)
    assert breaker_of(url, bad)["served"] > before
