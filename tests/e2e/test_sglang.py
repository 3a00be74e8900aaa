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

import contextlib
import json
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from orchestrator.fleet.page_chains import PageChains
from orchestrator.http.tokenizer import Tokenizer
from services.common.prefix_hash import block_hashes
from tests.cluster import LocalCluster
from tests.doubles.sglang_cpu.tokens import token_at

HEALTH_S = 3.0  # the decode's health check: longer than the orchestrator's 2 s RPC deadline
KV_MS_PER_TOKEN = 4.0  # a prefill's KV transfer time per prompt token
WORKERS = {
    "prefill-dp": ["--disaggregation-mode", "prefill", "--dp-size", "2"],
    "prefill-attn": ["--disaggregation-mode", "prefill", "--tp", "2", "--enable-dp-attention",
                     "--dp-size", "2", "--load-balance-method", "round_robin"],
    "decode": ["--disaggregation-mode", "decode", "--tp", "2", "--enable-dp-attention", "--dp-size", "2",
               "--moe-a2a-backend", "deepep"],
    "decode-2": ["--disaggregation-mode", "decode"],
}  # fmt: skip
DECODES = ("decode", "decode-2")


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


class KvEventTap:
    """The test's own subscriber to the prefill workers' SubscribeKvEvents (smg-grpc-servicer's
    relay of SGLang's publishers)."""

    def __init__(self, addresses: list[str]):
        self.batches: dict[str, list[common_pb2.KvEventBatch]] = {a: [] for a in addresses}
        self.calls, self.threads, self.channels = [], [], []
        for address in addresses:
            channel = grpc.insecure_channel(address)
            call = pb_grpc.SglangSchedulerStub(channel).SubscribeKvEvents(
                common_pb2.SubscribeKvEventsRequest()
            )
            self.calls.append(call)
            self.channels.append(channel)
            self.threads.append(threading.Thread(target=self._read, args=(address, call), daemon=True))
            self.threads[-1].start()

    def _read(self, address: str, call) -> None:
        with contextlib.suppress(grpc.RpcError):
            for batch in call:
                self.batches[address].append(batch)

    def close(self) -> None:
        """Cancel the streams and wait for their readers: a thread still inside gRPC's C core when
        the interpreter exits can abort it."""
        for call in self.calls:
            call.cancel()
        for thread in self.threads:
            thread.join(timeout=10)
        for channel in self.channels:
            channel.close()


@pytest.fixture(scope="module")
def sglang(ds_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang")
    c, tap = LocalCluster(), None
    files, addresses, bootstrap = {}, {}, {}
    try:
        for name, flags in WORKERS.items():
            files[name] = root / f"{name}.jsonl"
            double = ("--kv-ms-per-token", str(KV_MS_PER_TOKEN)) if name.startswith("prefill") else ()
            double += ("--health-s", str(HEALTH_S)) if name == "decode" else ()
            addresses[name], bootstrap[name] = c.sglang_worker(
                name, ds_dir, files[name], *flags, double=double, output=root / f"{name}.log"
            )
        for address in addresses.values():
            c.wait_sglang(address)
        prefill = []
        for name in ("prefill-dp", "prefill-attn"):
            prefill += [f"grpc://{addresses[name]}", str(bootstrap[name])]
        # Our own subscriber to the prefills' KV events, from before the first request (the relay
        # is live only, and a page is published once, when its rank first caches it).
        tap = KvEventTap([addresses[name] for name in WORKERS if name.startswith("prefill")])
        decode = [f"grpc://{addresses[name]}" for name in DECODES]
        url = c.orchestrator(ds_dir, prefill, decode, output=root / "orchestrator.log")
        CLUSTERS[url], TAPS[url] = c, tap
        yield url, Records(files), addresses
    finally:
        if tap is not None:
            tap.close()
        c.stop()


CLUSTERS: dict[str, LocalCluster] = {}
TAPS: dict[str, KvEventTap] = {}


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
    (_, p), (decode, d) = by_role["prefill"], by_role["decode"]
    assert p["room"] == d["room"] and p["rid"] == d["rid"]
    fetch = [e for e in records.read(decode) if e["event"] == "kv_fetch" and e["rid"] == d["rid"]]
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
    # SGLang's servicer reports the whole worker's running window (8 per rank here). DeepEP spans
    # the TP group: EP2 although --ep-size was left at 1; plain DP has no EP.
    want = {"prefill-dp": (16, 2, 1), "prefill-attn": (16, 2, 1), "decode": (16, 2, 2), "decode-2": (8, 1, 1)}
    for name in WORKERS:
        inst = seen[addresses[name]]
        assert inst["state"] == "ready", inst
        assert (inst["slots"], len(inst["dp_ranks"]), inst["ep_size"]) == want[name], (name, inst)
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


def test_sglang_s_kv_events_feed_the_prefix_index_in_its_blocks(sglang, ds_dir):
    """Item 5: SGLang's KV events (its SHA-256 page chain, one token per page, published by its own
    publisher and relayed by the servicer) become the 16-token blocks the prefix index computes
    from prompts; the orchestrator follows them for its SGLang prefills."""
    url, records, addresses = sglang
    tap = TAPS[url]
    prefills = [addresses[n] for n in WORKERS if n.startswith("prefill")]
    before = {a: instances(url)[a]["kv_events"]["blocks_stored"] for a in prefills}
    text = " ".join(f"shared{i}" for i in range(40))
    client(url).completions.create(model=ds_dir.name, prompt=text, max_tokens=2, temperature=0)
    tail = Tokenizer(ds_dir).encode(text)[-8:]
    ((name, g),) = [
        (n, g) for n, events in records.generates().items() for g in events
        if g["role"] == "prefill" and g["input_ids"][-8:] == tail
    ]  # fmt: skip
    want = block_hashes(g["input_ids"], 16)
    assert len(want) >= 4
    deadline = time.monotonic() + 10
    while True:
        chains, got = PageChains(16), defaultdict(set)
        for batch in list(tap.batches[addresses[name]]):
            rank = batch.dp_rank if batch.HasField("dp_rank") else None
            for event in batch.events:
                ours = chains.translate(("tap", rank), event)
                if ours is not None and ours.WhichOneof("data") == "stored":
                    got[rank] |= {b.block_hash for b in ours.stored.blocks}
        if set(want) <= got[g["rank"]] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert set(want) <= got[g["rank"]], (g["rank"], dict(got))  # on the rank that prefilled it
    assert not set(want) & set().union(*(v for r, v in got.items() if r != g["rank"]))
    assert chains.skipped == 0

    # The orchestrator's own feed took the same blocks into its index for that worker.
    def fed() -> int:
        return instances(url)[addresses[name]]["kv_events"]["blocks_stored"] - before[addresses[name]]

    deadline = time.monotonic() + 5
    while fed() < len(want) and time.monotonic() < deadline:
        time.sleep(0.1)
    # (SGLang's one-token pages passed through as they are would count about 16 per block.)
    assert len(want) <= fed() < 2 * len(want), instances(url)[addresses[name]]["kv_events"]


def test_a_decode_that_dies_mid_stream_is_migrated_from_and_the_reply_goes_on_exactly(sglang, ds_dir):
    """What SMG does not do for SGLang workers: the decode worker is killed while it streams; the
    request goes on on the other decode from its prompt plus the tokens already sent, and the
    client gets the reply an undisturbed stream gives, once (runs late: it kills a decode)."""
    url, records, addresses = sglang
    tok, n = Tokenizer(ds_dir), 300  # about 3 s of decode steps
    text = "tell me a long story about experts"
    stream = client(url).completions.create(
        model=ds_dir.name, prompt=text, max_tokens=n, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [next(iter(stream))]
    tail = tok.encode(text)[-6:]
    mine = [
        (name, g) for name in DECODES for g in records.generates()[name]
        if g["input_ids"][-6:] == tail and g["max_new_tokens"] == n
    ]  # fmt: skip
    assert len(mine) == 1, mine
    (victim, g), (survivor,) = mine[0], [d for d in DECODES if d != mine[0][0]]
    sglang_cluster(sglang).kill(victim)
    chunks += list(stream)
    expected = [token_at(g["input_ids"], k, tok.model_vocab_size) for k in range(n)]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == tok.decode(expected)
    assert chunks[-1].usage.completion_tokens == n
    # The rest came from the survivor: the prompt plus what the victim had sent, for what was left.
    (cont,) = [
        e for e in records.generates()[survivor] if e["rid"].startswith(g["rid"]) and e["rid"] != g["rid"]
    ]
    sent = len(cont["input_ids"]) - len(g["input_ids"])
    assert 0 < sent < n and cont["input_ids"] == g["input_ids"] + expected[:sent]
    assert cont["max_new_tokens"] == n - sent
    deadline = time.monotonic() + 10
    while instances(url)[addresses[victim]]["state"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert instances(url)[addresses[victim]]["state"] == "failed"


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
