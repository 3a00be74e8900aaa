"""Issue 27 with real workers: their gRPC behind the shared token, poison requests that leave every
breaker closed, a client that leaves counted as cancelled, and a connection that serves on after
a refused body.

The pool: one prefill and two decode workers and the orchestrator, all given one gRPC token (as
`moeserve up` and the chart give it), API keys on.
"""

from __future__ import annotations

import time

import grpc
import httpx
import openai
import pytest
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from services.common import wire
from tests.cluster import LocalCluster
from tests.e2e.test_retry import scrape
from tests.oracle import encode, greedy

TOKEN, KEY = "grpc-secret-for-tests", "api-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def guarded(ds_dir):
    c = LocalCluster()
    env = {wire.TOKEN_ENV: TOKEN}
    try:
        p = c.worker("prefill", "prefill", ds_dir, env=env)
        d1 = c.worker("decode-1", "decode", ds_dir, env=env)
        d2 = c.worker("decode-2", "decode", ds_dir, env=env)
        url = c.orchestrator(ds_dir, [p], [d1, d2], "--api-key", KEY, env=env)
        yield c, url
    finally:
        c.stop()


def api(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_a_worker_s_grpc_answers_only_with_the_token(guarded):
    c, _ = guarded
    stub = pb_grpc.SglangSchedulerStub(grpc.insecure_channel(c.addresses["decode-1"]))
    calls = {
        "GetServerInfo": lambda **kw: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5, **kw),
        "Abort": lambda **kw: stub.Abort(pb.AbortRequest(request_id="x"), timeout=5, **kw),
        "FlushCache": lambda **kw: stub.FlushCache(common_pb2.FlushCacheRequest(), timeout=5, **kw),
    }
    for name, rpc in calls.items():
        for metadata in ((), wire.auth_metadata("wrong")):
            with pytest.raises(grpc.RpcError) as err:
                rpc(metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert wire.TOKEN_ENV in err.value.details()
    assert calls["GetServerInfo"](metadata=wire.auth_metadata(TOKEN)).server_args


def test_requests_pass_the_token_from_the_orchestrator_through_decode_to_prefill(guarded, ds_dir):
    _, url = guarded
    expected = greedy(ds_dir, encode(ds_dir, "guarded path"), 5)
    for _ in range(2):  # both decode instances (least loaded, in turn)
        r = api(url).completions.create(model=ds_dir.name, prompt="guarded path", max_tokens=5, temperature=0)
        assert (r.choices[0].text, r.choices[0].finish_reason) == expected


def test_poison_requests_get_400_and_every_breaker_stays_closed(guarded, ds_dir):
    _, url = guarded
    poison = [{"seed": 2**64, "temperature": 1.0}, {"top_k": 2**31}, {"seed": -(2**63) - 1}]
    for _ in range(3):  # each once opened a decode's breaker; now none reaches a worker
        for extra in poison:
            r = httpx.post(
                f"{url}/v1/completions", headers=AUTH, timeout=30,
                json={"model": ds_dir.name, "prompt": "poison", "max_tokens": 2, **extra},
            )  # fmt: skip
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    # A seed anywhere in int64 is served.
    for seed in (2**63 - 1, -(2**63)):
        r = api(url).completions.create(
            model=ds_dir.name, prompt="poison", max_tokens=2, temperature=1.0, seed=seed
        )
        assert r.choices[0].finish_reason == "length"
    data = httpx.get(f"{url}/admin/instances", timeout=5).json()["data"]
    assert [(i["breaker"], i["breaker_opened"]) for i in data] == [("closed", 0)] * 3, data


def test_a_client_that_leaves_is_cancelled_not_an_error(guarded, ds_dir):
    _, url = guarded
    model = ("model", ds_dir.name)

    def outcome(name: str) -> float:
        return scrape(url).get(("moeserve_requests_total", (model, ("outcome", name))), 0.0)

    before = {name: outcome(name) for name in ("cancelled", "error", "ok")}
    stream = api(url).completions.create(
        model=ds_dir.name, prompt="tell me more", max_tokens=200, temperature=0, stream=True
    )
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while outcome("cancelled") == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert outcome("cancelled") == before["cancelled"] + 1
    assert outcome("error") == before["error"]


def test_a_connection_serves_on_after_a_refused_body(guarded, ds_dir):
    _, url = guarded
    deep = '{"model": "x", "prompt": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:  # one keep-alive connection
        for _ in range(2):
            r = http.post("/v1/completions", content=deep, headers={"content-type": "application/json"})
            assert r.status_code == 400 and "nested deeper" in r.json()["error"]["message"]
            r = http.post("/v1/completions", json={"model": ds_dir.name, "prompt": "a", "max_tokens": 1})
            assert r.status_code == 200, r.text
