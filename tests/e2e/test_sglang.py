"""Conformance: moeserve's orchestrator in front of SGLang's own gRPC workers, on CPU.

Each worker is `tests.doubles.sglang_cpu.worker`: SGLang 0.5.23's real entry point, argument parser,
smg-grpc-servicer 0.14.1's request manager, scheduler and health servicers, SGLang's bootstrap
server on prefill and its HTTP sidecar; only the GPU scheduler processes are a fake that speaks
their ZMQ protocol (`tests/doubles/sglang_cpu/scheduler.py`). The orchestrator is the unmodified
`moeserve serve`, driven with the official `openai` client.

The pool: a prefill with plain DP over 2 ranks (SGLang's DP controller places a request by
`room % 2`), a prefill with attention DP over 2 ranks and `--load-balance-method round_robin` (the
chart's flags: ZMQ deals the requests, the prefill registers each room's rank and decode asks),
and an attention-DP decode over DeepEP (its EP size resolves to its TP size) whose health check
takes longer than an ordinary RPC may.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.http.tokenizer import Tokenizer
from services.common.process import free_port, port_in_use
from tests.cluster import LocalCluster
from tests.doubles.sglang_cpu.tokens import token_at

START_S = 90.0
HEALTH_S = 3.0  # the decode's health check: longer than the orchestrator's 2 s RPC deadline
KV_MS_PER_TOKEN = 4.0  # a prefill's KV transfer time per prompt token
WORKERS = {
    "prefill-dp": ["--disaggregation-mode", "prefill", "--dp-size", "2"],
    "prefill-attn": ["--disaggregation-mode", "prefill", "--tp", "2", "--enable-dp-attention",
                     "--dp-size", "2", "--load-balance-method", "round_robin"],
    "decode": ["--disaggregation-mode", "decode", "--tp", "2", "--enable-dp-attention", "--dp-size", "2",
               "--moe-a2a-backend", "deepep"],
}  # fmt: skip


def sglang_ports(n: int) -> list[int]:
    """`--port`s for n SGLang workers: SGLang derives more from each (the HTTP sidecar on +1, the
    resolved gRPC port +10000, under attention DP its ZMQ ports from +233), so they are taken
    below the ephemeral range, 1000 apart, with those free."""
    rng = random.Random()
    while True:
        base = rng.randrange(20000, 30000 - 1000 * n)
        ports = [base + 1000 * i for i in range(n)]
        if not any(
            port_in_use("127.0.0.1", q)
            for p in ports
            for q in (p, p + 1, p + 10000, *range(p + 233, p + 240))
        ):
            return ports


def wait_serving(cluster: LocalCluster, address: str) -> None:
    """SGLang's standard gRPC health service says SERVING (no generation involved)."""
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if (why := cluster.cluster.dead()) is not None:
            raise RuntimeError(why)
        try:
            if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == 1:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"SGLang worker {address} not serving after {START_S:.0f}s")


class Records:
    """The fake schedulers' JSON-lines records, one file per worker."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def read(self, name: str) -> list[dict]:
        path = self.files[name]
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def of(self, rid_part: str) -> dict[str, list[dict]]:
        """Every worker's events of the request whose worker-side id contains `rid_part`."""
        return {name: [e for e in self.read(name) if rid_part in e["rid"]] for name in self.files}

    def generates(self) -> dict[str, list[dict]]:
        return {
            name: [
                e for e in self.read(name) if e["event"] == "generate" and not e["rid"].startswith("HEALTH")
            ]
            for name in self.files
        }


@pytest.fixture(scope="module")
def sglang(ds_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang")
    c = LocalCluster()
    files, addresses, bootstrap = {}, {}, {}
    try:
        for (name, flags), port in zip(WORKERS.items(), sglang_ports(len(WORKERS)), strict=True):
            files[name] = root / f"{name}.jsonl"
            args = ["-m", "tests.doubles.sglang_cpu.worker", "--record", str(files[name])]
            args += ["--kv-ms-per-token", str(KV_MS_PER_TOKEN)] if name.startswith("prefill") else []
            args += ["--health-s", str(HEALTH_S)] if name == "decode" else []
            args += [
                "--",
                "--model-path",
                str(ds_dir),
                "--grpc-mode",
                "--device",
                "cpu",
                "--host",
                "127.0.0.1",
            ]
            args += ["--port", str(port), "--skip-server-warmup", *flags]
            if name.startswith("prefill"):
                bootstrap[name] = free_port()
                args += ["--disaggregation-bootstrap-port", str(bootstrap[name])]
            c.procs[name] = c.cluster.spawn(name, args, output=root / f"{name}.log")
            addresses[name] = f"127.0.0.1:{port}"
        for address in addresses.values():
            wait_serving(c, address)
        prefill = []
        for name in ("prefill-dp", "prefill-attn"):
            prefill += [f"grpc://{addresses[name]}", str(bootstrap[name])]
        url = c.orchestrator(
            ds_dir, prefill, [f"grpc://{addresses['decode']}"], output=root / "orchestrator.log"
        )
        CLUSTERS[url] = c
        yield url, Records(files), addresses
    finally:
        c.stop()


CLUSTERS: dict[str, LocalCluster] = {}


def sglang_cluster(fixture: tuple) -> LocalCluster:
    return CLUSTERS[fixture[0]]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def instances(url: str) -> dict[str, dict]:
    data = httpx.get(f"{url}/admin/instances", timeout=5).json()["data"]
    return {i["address"]: i for i in data}


def test_a_chat_completion_streams_through_sglang_s_servicers(sglang, ds_dir):
    url, records, _ = sglang
    tok = Tokenizer(ds_dir)
    messages = [{"role": "user", "content": "Hello there"}]
    prompt = tok.apply_chat_template(messages)
    expected = [token_at(prompt, k, tok.model_vocab_size) for k in range(8)]
    stream = client(url).chat.completions.create(
        model=ds_dir.name, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tok.decode(expected)
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == len(prompt)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    # One room for both sides; decode fetched the KV from the rank that prefilled it.
    gens = records.generates()
    served = [(name, g) for name, events in gens.items() for g in events if g["input_ids"] == prompt]
    by_role = {g["role"]: (name, g) for name, g in served}
    assert set(by_role) == {"prefill", "decode"}
    (_, p), (_, d) = by_role["prefill"], by_role["decode"]
    assert p["room"] == d["room"] and p["rid"] == d["rid"]
    fetch = [e for e in records.read("decode") if e["event"] == "kv_fetch" and e["rid"] == d["rid"]]
    assert [f["prefill_rank"] for f in fetch] == [p["rank"]]


def test_rooms_land_on_the_rank_the_router_pinned_and_every_dp_request_completes(sglang, ds_dir):
    """SGLang's DP controller (and its prefill's room check) place a request by `room % ranks`; a
    prompt sent again goes to the rank that cached it only if its room says so."""
    url, records, _ = sglang
    api = client(url)
    prompts = [f"question number {i} about the weather" for i in range(6)]
    for _ in range(2):
        for p in prompts:
            r = api.completions.create(model=ds_dir.name, prompt=p, max_tokens=2, temperature=0)
            assert r.choices[0].finish_reason == "length"
    for name in ("prefill-dp", "prefill-attn"):
        finishes = [
            e for e in records.read(name) if e["event"] == "finish" and not e["rid"].startswith("HEALTH")
        ]
        assert finishes and all(f["reason"] == "length" for f in finishes), finishes
    ranks = defaultdict(set)
    for g in records.generates()["prefill-dp"]:
        assert g["rank"] == g["room"] % 2
        ranks[tuple(g["input_ids"])].add(g["rank"])
    assert ranks and all(len(r) == 1 for r in ranks.values()), ranks


def test_a_client_that_goes_away_aborts_the_request_on_both_schedulers(sglang, ds_dir):
    """The client gives up while the prefill's KV is still on its way: both schedulers get SGLang's
    AbortReq and end the request as aborted (nothing left running on either)."""
    url, records, _ = sglang
    prompt = " ".join(f"w{i}" for i in range(400))  # its KV transfer takes about five seconds
    impatient = client(url).with_options(timeout=2.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=ds_dir.name, prompt=prompt, max_tokens=50, stream=True)
    deadline = time.monotonic() + 10
    while True:
        gens = {
            n: [g for g in events if len(g["input_ids"]) > 300] for n, events in records.generates().items()
        }
        rids = {g["rid"] for events in gens.values() for g in events}
        ends = {
            e["role"]: e
            for n in records.files
            for e in records.read(n)
            if e["event"] == "finish" and e["rid"] in rids
        }
        if set(ends) == {"prefill", "decode"} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(rids) == 1 and {e["reason"] for e in ends.values()} == {"abort"}, ends
    aborts = {
        e["role"]
        for n in records.files
        for e in records.read(n)
        if e["event"] == "abort" and e["rid"] in rids
    }
    assert aborts == {"prefill", "decode"}
    assert ends["decode"]["sent"] == 0 and ends["prefill"]["sent"] == 0


def test_capacity_context_and_health_are_read_as_sglang_reports_them(sglang, ds_dir):
    url, _, addresses = sglang
    seen = instances(url)
    for name in WORKERS:
        inst = seen[addresses[name]]
        # SGLang's servicer reports the whole worker's running window (8 per rank here, 2 ranks).
        assert (inst["state"], inst["slots"], len(inst["dp_ranks"])) == ("ready", 16, 2), inst
    # DeepEP spans the TP group: EP2 although --ep-size was left at 1; plain DP has no EP.
    assert [seen[addresses[n]]["ep_size"] for n in WORKERS] == [1, 1, 2]
    # The decode answers HealthCheck in 3 s (SGLang gives its generation 20 s): ready, and none of
    # its health checks was given up on.
    decode = seen[addresses["decode"]]
    assert decode["reason"] == "healthy" and decode["health"]["checks"] >= 1, decode["health"]
    assert decode["health"]["failures"] == 0, decode["health"]
    # The context is the model's (2048 in config.json, less SGLang's margin), not the 4096-token KV pool.
    models = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
    assert models[0]["max_model_len"] == 2048 - 5
    with pytest.raises(openai.BadRequestError) as err:
        client(url).completions.create(
            model=ds_dir.name, prompt=[20 + i % 400 for i in range(2100)], max_tokens=4
        )
    assert "context" in str(err.value)


def test_a_prefill_that_dies_is_retried_elsewhere_and_marked_failed(sglang, ds_dir):
    """What SMG does not do for SGLang workers: a request whose prefill worker is gone is retried
    on another pair before its first token, and the instance leaves the pool (runs late: it kills
    a worker)."""
    url, records, addresses = sglang

    def served(name: str) -> int:
        ends = [e for e in records.read(name) if e["event"] == "finish" and not e["rid"].startswith("HEALTH")]
        return sum(e["reason"] == "length" for e in ends)

    before = served("prefill-attn")
    sglang_cluster(sglang).kill("prefill-dp")
    api = client(url)
    for i in range(6):
        r = api.completions.create(
            model=ds_dir.name, prompt=f"after the loss {i}", max_tokens=3, temperature=0
        )
        assert r.choices[0].finish_reason == "length"
    assert instances(url)[addresses["prefill-dp"]]["state"] == "failed"
    assert served("prefill-attn") - before == 6  # retries carry ids of their own (`-r1`): no stray abort


def test_a_drained_sglang_prefill_finishes_its_stream_then_leaves(sglang, ds_dir):
    """Drain (the pools CLI's scale-down) with an SGLang worker: its request in flight ends
    normally, then it is gone once SGLang's own load report shows it idle (runs last)."""
    url, _, addresses = sglang
    me = instances(url)[addresses["prefill-attn"]]
    stream = client(url).completions.create(
        model=ds_dir.name, prompt="a long answer please", max_tokens=150, temperature=0, stream=True
    )
    first = next(iter(stream))
    r = httpx.post(f"{url}/admin/instances/{me['id']}/drain", json={"deadline_s": 60}, timeout=5)
    assert r.status_code == 202 and r.json()["state"] == "draining"
    rest = list(stream)
    assert [c.choices[0].finish_reason for c in rest if c.choices[0].finish_reason] == ["length"]
    assert first.choices and len(rest) >= 50  # (the detokenizer may hold a partial character a chunk)
    deadline = time.monotonic() + 20
    while instances(url)[addresses["prefill-attn"]]["state"] != "gone" and time.monotonic() < deadline:
        time.sleep(0.2)
    gone = instances(url)[addresses["prefill-attn"]]
    assert (gone["state"], gone["reason"], gone["running"], gone["kv_used_tokens"]) == (
        "gone",
        "drained",
        0,
        0,
    )
    with pytest.raises(openai.APIStatusError) as err:
        client(url).completions.create(model=ds_dir.name, prompt="nobody left", max_tokens=2)
    assert err.value.status_code == 503 and "prefill" in str(err.value)
