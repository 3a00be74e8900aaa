"""Request ids and structured logs across real processes: a client's `x-request-id` comes back in
the response, names the request on both workers and appears in every component's JSON log line
for it; start-up output is our own few lines (no Mooncake glog chatter below debug)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.cluster import LocalCluster

LOG_OPTIONS = ("--log-format", "json", "--log-requests")


@pytest.fixture(scope="module")
def logged(ds_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    c = LocalCluster()
    try:
        p = c.worker("prefill", "prefill", ds_dir, *LOG_OPTIONS, output=logs / "prefill.log")
        d = c.worker("decode", "decode", ds_dir, *LOG_OPTIONS, output=logs / "decode.log")
        url = c.orchestrator(ds_dir, [p], [d], *LOG_OPTIONS, output=logs / "orchestrator.log")
        yield url, logs
    finally:
        c.stop()


def json_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def wait_for_lines(path, request_id: str, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in json_lines(path) if r.get("request_id") == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_request_id_travels_to_both_workers_and_back(logged, ds_dir):
    url, logs = logged
    body = {"model": ds_dir.name, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"x-request-id": "trace-42"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    assert r.json()["id"] == "cmpl-trace-42"
    for name, role in (("prefill", "prefill"), ("decode", "decode")):
        (line,) = wait_for_lines(logs / f"{name}.log", "trace-42")
        assert line["logger"] == "moeserve.requests" and line["role"] == role
        assert line["prompt_tokens"] > 0 and line["level"] == "info"
    (line,) = wait_for_lines(logs / "orchestrator.log", "trace-42")
    assert line["outcome"] == "ok" and line["completion_tokens"] == 3 and line["ttft_s"] > 0

    fresh = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    rid = fresh.headers["x-request-id"]
    assert len(rid) == 32 and fresh.json()["id"] == f"cmpl-{rid}"
    assert wait_for_lines(logs / "decode.log", rid)


def test_bad_request_ids_are_refused_with_an_id(logged, ds_dir):
    url, _ = logged
    body = {"model": ds_dir.name, "prompt": "Hello", "max_tokens": 2}
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"x-request-id": "no spaces"}, timeout=30)
    assert r.status_code == 400 and "x-request-id" in r.json()["error"]["message"]
    assert len(r.headers["x-request-id"]) == 32
    r = httpx.post(f"{url}/v1/completions", content=b"{", headers={"x-request-id": "t-1"}, timeout=30)
    assert r.status_code == 400 and r.headers["x-request-id"] == "t-1"


def test_start_up_output_is_quiet(logged):
    _, logs = logged
    for name in ("prefill", "decode"):
        text = (logs / f"{name}.log").read_text()
        assert "moeserve worker ready" in text
        assert "InitGoogleLogging" not in text and "segment descriptor" not in text
        other = [ln for ln in text.splitlines() if ln and not ln.startswith(("{", "moeserve worker ready"))]
        assert other == []  # every line is ours: JSON records or the one ready line
