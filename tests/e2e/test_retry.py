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


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_parse_and_move_under_load(flaky):
    _, url, _ = flaky
    model = ("model", "deepseek_v3")
    before = scrape(url)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    for i in range(6):
        stream = client.completions.create(model="deepseek_v3", prompt=f"m {i}", max_tokens=5, stream=True)
        list(stream)
    after = scrape(url)

    def moved(name: str, labels: tuple = (model,)) -> float:
        key = (name, tuple(sorted(labels)))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("moeserve_time_to_first_token_seconds_count") == 6
    assert moved("moeserve_e2e_request_latency_seconds_count") == 6
    assert moved("moeserve_inter_token_latency_seconds_count") >= 6 * 3
    assert moved("moeserve_requests_total", (model, ("outcome", "ok"))) == 6
    assert after[("moeserve_retries_total", ())] >= REFUSALS  # the refusals of the first test
    instances = {dict(k[1]).get("instance") for k in after if k[0] == "moeserve_instance_state"}
    assert {"prefill-1", "prefill-2", "decode-3"} <= instances
