"""Draining instances under traffic on a static pool: the drained instance finishes what it has and
takes nothing new; past its deadline its requests end with a clear error; no KV stays behind."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.cluster import LocalCluster


@pytest.fixture(scope="module")
def pools(ds_dir):
    c = LocalCluster()
    try:
        p = c.worker("prefill", "prefill", ds_dir)
        decodes = [c.worker(f"decode-{i}", "decode", ds_dir) for i in range(3)]
        url = c.orchestrator(ds_dir, [p], decodes)
        yield c, url
    finally:
        c.stop()


def instances(url: str) -> list[dict]:
    return httpx.get(f"{url}/admin/instances", timeout=5).json()["data"]


def wait_for(check, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stream_in_background(url: str, max_tokens: int) -> tuple[list, threading.Thread]:
    """A streaming completion read into a list: chunks, then ("done", finish_reason) or ("error", msg)."""
    got: list = []

    def run() -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        try:
            stream = client.completions.create(
                model="deepseek_v3",
                prompt="drain me",
                max_tokens=max_tokens,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for chunk in stream:
                got.append(chunk)
                if chunk.choices and chunk.choices[0].finish_reason:
                    got.append(("done", chunk.choices[0].finish_reason))
        except openai.APIError as e:
            got.append(("error", str(e)))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return got, t


def busy_decode(url: str) -> dict:
    return wait_for(
        lambda: next((i for i in instances(url) if i["role"] == "decode" and i["inflight"] == 1), None),
        what="a decode instance with the stream",
    )


def test_a_drained_instance_finishes_its_stream_and_takes_nothing_new(pools):
    _, url = pools
    got, reader = stream_in_background(url, 300)
    busy = busy_decode(url)
    r = httpx.post(f"{url}/admin/instances/{busy['id']}/drain", json={"deadline_s": 120}, timeout=5)
    assert r.status_code == 202 and r.json()["state"] == "draining"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    for i in range(4):  # new requests go to the others meanwhile
        res = client.completions.create(model="deepseek_v3", prompt=f"elsewhere {i}", max_tokens=4)
        assert res.choices[0].finish_reason in ("length", "stop")
        me = next(x for x in instances(url) if x["id"] == busy["id"])
        assert me["inflight"] <= 1 and me["state"] in ("draining", "gone")
    reader.join(timeout=120)
    assert got[-1] == ("done", "length") and sum(len(ch.choices[0].text) > 0 for ch in got[:-1]) > 0
    gone = wait_for(
        lambda: next((x for x in instances(url) if x["id"] == busy["id"] and x["state"] == "gone"), None),
        what="the drained instance to be gone",
    )
    assert gone["reason"] == "drained" and gone["kv_used_tokens"] == 0 and gone["running"] == 0


def test_past_its_deadline_a_drain_ends_the_requests_with_a_clear_error(pools):
    c, url = pools
    got, reader = stream_in_background(url, 1500)
    busy = busy_decode(url)
    r = httpx.post(f"{url}/admin/instances/{busy['id']}/drain", json={"deadline_s": 0.5}, timeout=5)
    assert r.status_code == 202
    reader.join(timeout=60)
    assert not reader.is_alive()
    kind, detail = got[-1]
    assert kind == "error" and "was drained and its deadline passed" in detail and "retry" in detail, got[-1]
    me = wait_for(
        lambda: next((x for x in instances(url) if x["id"] == busy["id"] and x["state"] == "gone"), None),
        what="the instance to be gone",
    )
    assert "deadline" in me["reason"]
    # No KV left behind on the drained worker.
    address = busy["address"]
    name = next(n for n, a in c.addresses.items() if a == address)
    wait_for(lambda: c.load(name).num_used_tokens == 0, what="the worker's KV to be free")
