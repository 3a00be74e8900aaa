"""Expert-parallel instances behind the OpenAI API: exactness, DP ranks, load statistics, failure."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from orchestrator.dispatch.policies import create as create_policy
from orchestrator.fleet.kv_event_feed import KvEventFeed
from orchestrator.fleet.registry import Registry
from services.common import wire
from services.common.prefix_hash import block_hashes
from services.common.process import free_port
from services.proto.moeserve.v1 import kv_handoff_pb2 as kvpb
from services.proto.moeserve.v1 import kv_handoff_pb2_grpc as kvpb_grpc
from services.proto.moeserve.v1 import worker_control_pb2 as ctl
from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc
from tests.cluster import LocalCluster, wait_first_tokens
from tests.oracle import chat_ids, encode, greedy, greedy_ids

MESSAGES = [{"role": "user", "content": "Explain expert parallelism."}]


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ep2_ep2(ds_dir):
    c = LocalCluster()
    try:
        p = c.worker("prefill", "prefill", ds_dir, "--ep", "2", "--ep-slots", "18", *metrics(c, "prefill"))
        d = c.worker("decode", "decode", ds_dir, "--ep", "2", "--ep-slots", "20", *metrics(c, "decode"))
        yield c, c.orchestrator(ds_dir, [p], [d])
    finally:
        c.stop()


def test_prefill_ep2_to_decode_ep2_is_exact(ep2_ep2, ds_dir):
    c, url = ep2_ep2
    client = client_for(url)
    text, reason = greedy(ds_dir, chat_ids(ds_dir, MESSAGES), 24)
    res = client.chat.completions.create(model=ds_dir.name, messages=MESSAGES, max_tokens=24, temperature=0)
    assert res.choices[0].message.content == text and res.choices[0].finish_reason == reason

    prompts = ["Prefill runs on", "Decode streams tokens", "The KV cache", "Experts live on ranks"]

    def stream(prompt: str) -> str:
        chunks = client.completions.create(
            model=ds_dir.name, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
        return "".join(ch.choices[0].text for ch in chunks)

    with cf.ThreadPoolExecutor(4) as ex:  # concurrent requests spread over both DP ranks
        got = list(ex.map(stream, prompts))
    assert got == [greedy(ds_dir, encode(ds_dir, p), 12)[0] for p in prompts]
    c.assert_idle()


def test_first_tokens_come_straight_from_prefill_and_none_twice(ep2_ep2, ds_dir):
    """Decode-first: prefill's FirstTokens stream brings the router each first token as soon as it is
    sampled, ahead of the KV transfer; decode's copy of it is dropped, so every stream stays exact.
    Requests that ask for log-probabilities take decode's first token (the feed carries none)."""
    c, url = ep2_ep2
    client = client_for(url)

    def first_tokens() -> dict[str, float]:
        front = scrape(f"{url}/metrics")
        return {
            s: front.get(("moeserve_first_tokens_total", (("source", s),)), 0.0)
            for s in ("prefill", "decode")
        }

    prompts = [f"Tokens from prefill {i}" for i in range(6)]
    wait_first_tokens(url)
    before = first_tokens()
    for prompt in prompts:
        chunks = client.completions.create(
            model=ds_dir.name, prompt=prompt, max_tokens=6, temperature=0, stream=True
        )
        pieces = [ch.choices[0].text for ch in chunks]
        assert "".join(pieces) == greedy(ds_dir, encode(ds_dir, prompt), 6)[0]
    after = first_tokens()
    came = {s: after[s] - before[s] for s in after}
    assert came["prefill"] >= 1 and came["prefill"] + came["decode"] == len(prompts)  # each named it
    # Both prefill DP ranks send it, rank 1 over ZeroMQ to rank 0's gRPC server: pinned, straight
    # to the decode instance with a feed of the test's own.
    channel = grpc.insecure_channel(c.addresses["prefill"])
    feed = kvpb_grpc.KVHandoffStub(channel).FirstTokens(kvpb.FirstTokensRequest(feed="test"), timeout=60)
    assert not next(feed).tokens  # subscribed
    ids = encode(ds_dir, prompts[0])
    host, port = c.addresses["prefill"].rsplit(":", 1)
    for rank in (0, 1):
        req = pb.GenerateRequest(
            request_id=f"pinned-{rank}",
            tokenized=pb.TokenizedInput(input_ids=ids),
            sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=2),
            disaggregated_params=pb.DisaggregatedParams(
                bootstrap_host=host, bootstrap_port=int(port), bootstrap_room=900 + rank
            ),
            stream=True,
        )
        meta = wire.forward_metadata(rank, "test")
        done = list(c.stub("decode").Generate(req, timeout=60, metadata=meta))[-1].complete
        token = next(feed).tokens
        assert [(t.room, t.token_id) for t in token] == [(900 + rank, done.output_ids[0])]
    feed.cancel()
    channel.close()
    res = client.completions.create(
        model=ds_dir.name, prompt=prompts[0], max_tokens=3, temperature=0, logprobs=2
    )
    assert len(res.choices[0].logprobs.tokens) == 3 and first_tokens() == after
    c.assert_idle()


def grpc_calls(c: LocalCluster, name: str) -> dict[str, int]:
    """gRPC calls the instance's server (rank 0) has received, per method."""
    info = c.stub(name).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    return {m: int(n) for m, n in info.scheduler_info["grpc_calls"].items()}


def listening_ports(pid: int) -> list[int]:
    """TCP ports the process listens on (its socket inodes matched against /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_one_grpc_stream_per_request_and_none_between_ranks(ep2_ep2, ds_dir):
    c, url = ep2_ep2
    counted = ("Generate", "Attach", "Release", "Abort")
    expected = greedy(ds_dir, encode(ds_dir, "one hop"), 4)[0]

    def calls_of_one_request(base: str) -> dict[str, dict[str, int]]:
        before = {n: grpc_calls(c, n) for n in ("prefill", "decode")}
        res = client_for(base).completions.create(
            model=ds_dir.name, prompt="one hop", max_tokens=4, temperature=0
        )
        assert res.choices[0].text == expected and res.choices[0].finish_reason == "length"
        after = {n: grpc_calls(c, n) for n in ("prefill", "decode")}
        return {n: {m: after[n].get(m, 0) - before[n].get(m, 0) for m in counted} for n in after}

    # Decode-first (our workers on both sides): the orchestrator calls decode alone, and the decode
    # rank's one Attach carries the request to the prefill instance.
    delta = calls_of_one_request(url)
    assert delta["prefill"] == {"Generate": 0, "Attach": 1, "Release": 0, "Abort": 0}
    assert delta["decode"] == {"Generate": 1, "Attach": 0, "Release": 0, "Abort": 0}
    # SGLang's dual dispatch, as SMG does it: one Generate to each side, and the Attach.
    p, d = c.addresses["prefill"], c.addresses["decode"]
    dual = c.orchestrator(ds_dir, [p], [d], "--dispatch", "dual", name="orchestrator-dual")
    delta = calls_of_one_request(dual)
    assert delta["prefill"] == {"Generate": 1, "Attach": 1, "Release": 0, "Abort": 0}
    assert delta["decode"] == {"Generate": 1, "Attach": 0, "Release": 0, "Abort": 0}
    serve = [
        sys.executable,
        "-m",
        "orchestrator.serve",
        "--model",
        str(ds_dir),
        "--prefill",
        p,
        "--decode",
        d,
    ]
    bad = subprocess.run([*serve, "--port", str(free_port()), "--dispatch", "single"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "--dispatch is 'single'; it must be one of auto, dual" in bad.stderr
    # The other ranks serve no gRPC at all: rank 0 hands them calls over ZeroMQ.
    for name in ("prefill", "decode"):
        info = c.stub(name).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        for pid in [int(p) for p in info.server_args["rank_pids"]][1:]:
            ports = listening_ports(pid)
            assert ports  # its ZeroMQ and transfer-engine sockets
            for port in ports:
                stub = pb_grpc.SglangSchedulerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
                with pytest.raises(grpc.RpcError):
                    stub.HealthCheck(pb.HealthCheckRequest(), timeout=0.5)
    c.assert_idle()


def test_dp_ranks_loads_and_expert_statistics(ep2_ep2, ds_dir):
    c, _ = ep2_ep2
    loads = c.stub("decode").GetLoads(pb.GetLoadsRequest(), timeout=10)
    assert loads.dp_rank_count == 2 and [ld.dp_rank for ld in loads.loads] == [0, 1]
    # A pinned DP rank is honoured (monolithic request, so only this instance is involved).
    req = pb.GenerateRequest(
        request_id="pinned",
        tokenized=pb.TokenizedInput(input_ids=list(range(5, 30))),
        data_parallel_rank=1,
        sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=300, ignore_eos=True),
        stream=True,
    )
    stream = c.stub("decode").Generate(req, timeout=60)
    next(stream)
    busy = {
        ld.dp_rank: ld.num_running_reqs
        for ld in c.stub("decode").GetLoads(pb.GetLoadsRequest(), timeout=10).loads
    }
    assert busy == {0: 0, 1: 1}
    list(stream)
    bad = pb.GenerateRequest(
        request_id="bad", tokenized=pb.TokenizedInput(input_ids=[1, 2]), data_parallel_rank=5
    )
    with pytest.raises(grpc.RpcError) as e:
        list(c.stub("decode").Generate(bad, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in e.value.details()

    load = ctl_grpc.WorkerControlStub(grpc.insecure_channel(c.addresses["decode"])).GetExpertLoad(
        ctl.GetExpertLoadRequest(), timeout=10
    )
    assert load.ep_size == 2 and load.num_slots == 20 and load.num_experts == 16
    assert load.window_tokens > 0 and len(load.layers) == 2
    for layer in load.layers:  # every token's top-k choices are counted once, over all ranks
        assert sum(layer.tokens_per_expert) == load.window_tokens * load.top_k


def metrics(c: LocalCluster, name: str) -> tuple[str, str]:
    c.addresses[f"{name}-metrics"] = f"127.0.0.1:{(port := free_port())}"
    return "--metrics-port", str(port)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_workers_serve_their_own_metrics(ep2_ep2, ds_dir):
    """Step time, batch size, tokens, KV, hand-off totals and balancedness, per DP rank, on a port apart."""
    c, url = ep2_ep2
    pm, dm = (f"http://{c.addresses[f'{n}-metrics']}/metrics" for n in ("prefill", "decode"))
    before_p, before_d = scrape(pm), scrape(dm)
    prompt = encode(ds_dir, "metrics of a worker " * 4)
    res = client_for(url).completions.create(model=ds_dir.name, prompt=prompt, max_tokens=5, temperature=0)
    assert res.usage.completion_tokens == 5
    after_p, after_d = scrape(pm), scrape(dm)

    def moved(before, after, name, **labels) -> float:
        keys = [k for k in after if k[0] == name and labels.items() <= dict(k[1]).items()]
        return sum(after[k] - before.get(k, 0.0) for k in keys)

    assert after_p[("moeserve_worker_up", ())] == 1.0
    ranks = {dict(k[1])["dp_rank"] for k in after_d if k[0] == "moeserve_worker_step_seconds_count"}
    assert ranks == {"0", "1"}
    assert moved(before_p, after_p, "moeserve_worker_tokens_total", phase="prefill") == len(prompt)
    # decode computes 4 tokens: the first of the 5 was sampled by prefill
    assert moved(before_d, after_d, "moeserve_worker_tokens_total", phase="decode") == 4
    assert moved(before_p, after_p, "moeserve_worker_step_seconds_count", phase="prefill") >= 1
    assert moved(before_p, after_p, "moeserve_worker_step_seconds_sum", phase="prefill") > 0
    assert moved(before_d, after_d, "moeserve_worker_batch_requests_count", phase="decode") >= 4
    assert moved(before_p, after_p, "moeserve_worker_kv_transfer_rooms_total") == 1
    assert moved(before_p, after_p, "moeserve_worker_kv_transfer_bytes_total") > 0
    assert after_d[("moeserve_worker_kv_total_tokens", (("dp_rank", "0"), ("role", "decode")))] > 0
    assert moved(before_d, after_d, "moeserve_worker_grpc_calls_total", method="Generate") == 1

    load = ctl_grpc.WorkerControlStub(grpc.insecure_channel(c.addresses["decode"])).GetExpertLoad(
        ctl.GetExpertLoadRequest(), timeout=10
    )
    per_rank = []  # default placement of 20 slots over 2 ranks: slots 16..19 replicate experts 0..3
    for layer in load.layers:
        tokens = list(layer.tokens_per_expert)
        slots = [tokens[s % 16] / (2 if s % 16 < 4 else 1) for s in range(20)]
        ranks_load = [sum(slots[:10]), sum(slots[10:])]
        per_rank.append(sum(ranks_load) / 2 / max(ranks_load))
    gauge = scrape(dm)[("moeserve_worker_expert_balancedness", (("role", "decode"),))]
    assert gauge == pytest.approx(sum(per_rank) / len(per_rank)) and 0.5 <= gauge <= 1.0

    front = scrape(f"{url}/metrics")
    latency = [v for k, v in front.items() if k[0] == "moeserve_instance_kv_transfer_latency_seconds"]
    assert len(latency) == 1 and latency[0] > 0
    assert any(k[0] == "moeserve_instance_expert_balancedness" for k in front)


@pytest.mark.parametrize("stream", [False, True])
def test_prefix_cache_hits_are_exact_and_reported_through_the_handoff(ep2_ep2, ds_dir, stream):
    """A long system prompt, then other user turns: later turns find it in the prefill rank's cache
    (the orchestrator pins that DP rank), report it as cached_tokens, and answer exactly."""
    c, url = ep2_ep2
    system = {"role": "system", "content": f"[{stream}] You are a terse assistant for MoE serving. " * 12}
    client = client_for(url)
    sent: list[list[int]] = []
    for turn in ("first question", "second one", "third"):
        messages = [system, {"role": "user", "content": turn}]
        ids = chat_ids(ds_dir, messages)
        res = client.chat.completions.create(
            model=ds_dir.name, messages=messages, max_tokens=6, temperature=0, stream=stream,
            stream_options={"include_usage": True} if stream else None,
        )  # fmt: skip
        chunks = list(res) if stream else [res]
        if stream:
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        else:
            text = res.choices[0].message.content
        assert text == greedy(ds_dir, ids, 6)[0]
        usage = chunks[-1].usage
        shared = max((common_prefix(ids, before) for before in sent), default=0)
        assert usage.prompt_tokens == len(ids)
        assert usage.prompt_tokens_details.cached_tokens == min(shared, len(ids) - 1) // 16 * 16
        sent.append(ids)
    assert shared >= 100  # the system prompt (more than six pages) is what the turns share
    c.assert_idle()


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_prefill_ranks_report_their_cache_as_kv_events_and_the_feed_follows(ep2_ep2, ds_dir):
    """SubscribeKvEvents streams each DP rank's stored blocks (hashes the orchestrator computes
    from the prompt) and, after FlushCache, their removal; the orchestrator's feed keeps its
    prefix-affinity index in step."""
    c, _ = ep2_ep2
    ids = list(range(40, 40 + 53))  # three full pages of 16 (and 5 tokens more)
    hashes = block_hashes(ids, 16)

    async def scenario():
        registry = Registry()
        inst = registry.add("prefill", c.addresses["prefill"])
        await inst.poll()
        policy = create_policy("prefix_affinity")
        feed = KvEventFeed(registry, policy)
        await feed.start()
        try:
            stub = pb_grpc.SglangSchedulerStub(grpc.aio.insecure_channel(c.addresses["prefill"]))
            events = stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest())
            request = pb.GenerateRequest(
                request_id="events", tokenized=pb.TokenizedInput(input_ids=ids), data_parallel_rank=1,
                sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=2),
            )  # fmt: skip
            async for _ in stub.Generate(request):
                pass
            batch = await _until(events, lambda b: b.dp_rank == 1 and hashes[0] in _stored(b))
            assert _stored(batch)[-3:] == hashes  # the prompt's three pages, on the rank it was pinned to
            assert {blk.block_size for e in batch.events for blk in e.stored.blocks} == {16}
            await _eventually(lambda: all((inst.id, 1) in policy._index.get(h, {}) for h in hashes))
            flushed = await stub.FlushCache(common_pb2.FlushCacheRequest())
            assert flushed.success and "dropped" in flushed.message
            removed = await _until(
                events, lambda b: b.dp_rank == 1 and any(e.HasField("removed") for e in b.events)
            )
            assert set(hashes) <= {h for e in removed.events for h in e.removed.block_hashes}
            await _eventually(lambda: not any((inst.id, 1) in policy._index.get(h, {}) for h in hashes))
            events.cancel()
        finally:
            await feed.stop()
            await inst.close()

    asyncio.run(scenario())


def _stored(batch) -> list[int]:
    return [blk.block_hash for e in batch.events if e.HasField("stored") for blk in e.stored.blocks]


async def _until(stream, wanted, timeout: float = 20.0):
    async with asyncio.timeout(timeout):
        async for batch in stream:
            if wanted(batch):
                return batch
    raise AssertionError("the event stream ended")


async def _eventually(condition, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def test_a_placement_planned_from_dumped_loads_serves_exactly(ep2_ep2, ds_dir, tmp_path):
    """`moeserve eplb dump` an instance's loads, `eplb plan` a placement, and a worker started
    with `--ep-placement` holds it (its slots and replicas) and answers exactly."""
    c, _ = ep2_ep2
    loads, placement = tmp_path / "loads.json", tmp_path / "placement.json"
    eplb = [sys.executable, "-m", "services.eplb"]
    run = subprocess.run([*eplb, "dump", "--instance", c.addresses["decode"], "-o", str(loads)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    run = subprocess.run([*eplb, "plan", "--loads", str(loads), "--slots", "20", "-o", str(placement)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0 and "balancedness on these loads" in run.stdout, run.stderr
    phy2log = json.loads(placement.read_text())["phy2log"]
    assert len(phy2log) == 2 and all(len(row) == 20 and set(row) == set(range(16)) for row in phy2log)
    bad = subprocess.run([*eplb, "plan", "--loads", str(loads), "--slots", "20", "--gpus", "3", "-o", "x"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "do not split evenly" in bad.stderr
    local = tmp_path / "local.json"  # two nodes of one rank each, experts' groups kept on nodes
    plan = [*eplb, "plan", "--loads", str(loads), "--slots", "20"]
    run = subprocess.run([*plan, "--nodes", "2", "--groups", "2", "--policy", "locality", "-o", str(local)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0 and json.loads(local.read_text())["num_nodes"] == 2, run.stderr
    bad = subprocess.run([*plan, "--policy", "best", "-o", "x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown policy" in bad.stderr

    address = c.worker("planned", "decode", ds_dir, "--ep", "2", "--ep-placement", str(placement))
    prompt = encode(ds_dir, "placed experts answer the same")
    request = pb.GenerateRequest(
        request_id="placed", tokenized=pb.TokenizedInput(input_ids=prompt),
        sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=8),
    )  # fmt: skip
    (done,) = [r.complete for r in c.stub("planned").Generate(request, timeout=60)]
    assert list(done.output_ids) == greedy_ids(ds_dir, prompt, 8)
    held = ctl_grpc.WorkerControlStub(grpc.insecure_channel(address)).GetExpertLoad(
        ctl.GetExpertLoadRequest(), timeout=10
    )
    assert held.num_slots == 20 and held.ep_size == 2


def test_prefill_ep1_to_decode_ep2_is_exact_qwen3(model_dirs):
    qwen = model_dirs["qwen3_moe"]
    c = LocalCluster()
    try:
        p = c.worker("prefill", "prefill", qwen)
        d = c.worker("decode", "decode", qwen, "--ep", "2", "--ep-slots", "20")
        url = c.orchestrator(qwen, [p], [d])
        text, _ = greedy(qwen, chat_ids(qwen, MESSAGES), 20)
        res = client_for(url).chat.completions.create(
            model=qwen.name, messages=MESSAGES, max_tokens=20, temperature=0
        )
        assert res.choices[0].message.content == text
        c.assert_idle()
    finally:
        c.stop()


def test_killing_one_rank_takes_the_instance_out_cleanly(ds_dir):
    c = LocalCluster()
    try:
        p = c.worker("prefill", "prefill", ds_dir)
        d = c.worker("decode", "decode", ds_dir, "--ep", "2")
        url = c.orchestrator(ds_dir, [p], [d])
        pids = list(
            c.stub("decode").GetServerInfo(pb.GetServerInfoRequest(), timeout=10).server_args["rank_pids"]
        )
        client = client_for(url)
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(
                client.completions.create,
                model=ds_dir.name,
                prompt="x",
                max_tokens=2000,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            deadline = time.monotonic() + 30
            while c.load("decode").num_running_reqs == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            start = time.monotonic()
            os.kill(int(pids[1]), signal.SIGKILL)  # one rank of the decode group dies
            with pytest.raises(openai.APIStatusError) as e:
                fut.result(timeout=60)
        assert time.monotonic() - start < 20  # fails fast, no hang
        assert e.value.status_code in (502, 503)
        assert "decode worker" in str(e.value)
        # The whole instance is out of service: unhealthy, or gone once the group has stopped.
        deadline = time.monotonic() + 20
        healthy = True
        while healthy and time.monotonic() < deadline:
            try:
                healthy = c.stub("decode").HealthCheck(pb.HealthCheckRequest(), timeout=2).healthy
            except grpc.RpcError:
                healthy = False
            time.sleep(0.2)
        assert not healthy
        assert c.procs["decode"].wait(timeout=30) != 0  # the launcher stops the rest of the group
    finally:
        c.stop()
