"""Instances over two "nodes" on one machine, each node on its own loopback address.

Node 0 runs on 127.0.0.1 and node 1 on 127.0.0.2 (the whole 127.0.0.0/8 range is loopback): each
node is its own `moeserve worker --nnodes 2 --node-rank K --host ADDR` process with two EP ranks,
and the four ranks form one EP4 instance through node 0's store.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import socket
import subprocess
import sys
import time

import grpc
import openai
import pytest
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from services.common.process import free_port
from services.proto.moeserve.v1 import worker_control_pb2 as ctl
from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc
from tests.cluster import LocalCluster
from tests.listeners import ANY, listening
from tests.oracle import chat_ids, encode, greedy, greedy_ids

NODES = ("127.0.0.1", "127.0.0.2")
MESSAGES = [{"role": "user", "content": "Explain a two-node expert-parallel group."}]


@pytest.fixture(scope="module")
def groups(model_dirs):
    """A DeepSeek-V3 prefill and decode instance and a Qwen3-MoE instance, each over two nodes."""
    ds, qwen = model_dirs["deepseek_v3"], model_dirs["qwen3_moe"]
    c = LocalCluster()
    try:
        p = c.group("ds-prefill", "prefill", ds, NODES, "--ep-slots", "20")
        d = c.group("ds-decode", "decode", ds, NODES)
        c.group("qwen", "decode", qwen, NODES, "--ep-slots", "24")
        yield c, c.orchestrator(ds, [p], [d])
    finally:
        c.stop()


def ids_on_every_rank(c: LocalCluster, name: str, model_dir, ranks: int = 4) -> None:
    """One greedy request pinned to each DP rank, all at once: each equals transformers'."""
    prompts = [encode(model_dir, f"rank {r} runs on node {r // 2}") for r in range(ranks)]

    def one(r: int) -> list[int]:
        req = pb.GenerateRequest(
            request_id=f"{name}-{r}",
            tokenized=pb.TokenizedInput(input_ids=prompts[r]),
            data_parallel_rank=r,
            sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=12),
        )
        return list(list(c.stub(name).Generate(req, timeout=120))[-1].complete.output_ids)

    with cf.ThreadPoolExecutor(ranks) as ex:
        got = list(ex.map(one, range(ranks)))
    assert got == [greedy_ids(model_dir, p, 12) for p in prompts]


@pytest.mark.parametrize("family, name", [("deepseek_v3", "ds-decode"), ("qwen3_moe", "qwen")])
def test_two_node_ep4_instance_is_exact(groups, model_dirs, family, name):
    c, _ = groups
    info = c.stub(name).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert info.server_args["ep_size"] == 4 and info.server_args["nnodes"] == 2
    loads = c.stub(name).GetLoads(pb.GetLoadsRequest(), timeout=10)
    assert [ld.dp_rank for ld in loads.loads] == [0, 1, 2, 3]
    ids_on_every_rank(c, name, model_dirs[family])
    c.assert_idle(name)


def test_prefill_on_two_nodes_to_decode_on_two_nodes_is_exact(groups, model_dirs):
    c, url = groups
    ds = model_dirs["deepseek_v3"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    text, reason = greedy(ds, chat_ids(ds, MESSAGES), 20)
    res = client.chat.completions.create(model=ds.name, messages=MESSAGES, max_tokens=20, temperature=0)
    assert res.choices[0].message.content == text and res.choices[0].finish_reason == reason
    prompts = [f"request {i} crosses nodes" for i in range(6)]  # spread over all DP ranks of both sides

    def stream(prompt: str) -> str:
        chunks = client.completions.create(
            model=ds.name, prompt=prompt, max_tokens=10, temperature=0, stream=True
        )
        return "".join(ch.choices[0].text for ch in chunks)

    with cf.ThreadPoolExecutor(6) as ex:
        got = list(ex.map(stream, prompts))
    assert got == [greedy(ds, encode(ds, p), 10)[0] for p in prompts]
    c.assert_idle("ds-prefill", "ds-decode")


def test_a_two_node_instance_rebalances_with_the_locality_policy(groups, model_dirs):
    """A re-plan from the window keeps each node's single-slot experts together (the locality
    policy: replicas go where node loads need them) and the answers stay exact."""
    c, _ = groups
    stub = ctl_grpc.WorkerControlStub(grpc.insecure_channel(c.addresses["qwen"]))
    ids_on_every_rank(c, "qwen", model_dirs["qwen3_moe"])  # load in the window
    before = stub.GetExpertLoad(ctl.GetExpertLoadRequest(), timeout=10)
    res = stub.Rebalance(ctl.RebalanceRequest(), timeout=60)
    assert res.version == before.placement_version + 1
    assert res.balancedness_after >= res.balancedness_before - 0.011
    after = stub.GetExpertLoad(ctl.GetExpertLoadRequest(), timeout=10)
    rows = [after.phy2log[i : i + after.num_slots] for i in range(0, len(after.phy2log), after.num_slots)]
    for row in rows:
        halves = [set(row[: len(row) // 2]), set(row[len(row) // 2 :])]
        single = {e for e in row if row.count(e) == 1}
        assert (
            single & halves[0] and single & halves[1] and sorted(set(row)) == list(range(after.num_experts))
        )
    ids_on_every_rank(c, "qwen", model_dirs["qwen3_moe"])
    c.assert_idle("qwen")


def test_node_1_listens_on_its_own_address_but_where_a_library_cannot(groups):
    """Each rank process of node 1 (127.0.0.2): our ZeroMQ socket on the node's address; the rest
    are the library listeners the README names: Mooncake's handshake and TCP transport (all
    interfaces) and gloo (the address the hostname resolves to)."""
    c, _ = groups
    gloo = socket.gethostbyname(socket.gethostname())
    ranks = listening(c.procs["ds-decode-node1"].pid)
    assert len(ranks) == 2, ranks  # the launcher itself listens on nothing
    for socks in ranks.values():
        hosts = sorted(s.rsplit(":", 1)[0] for s in socks)
        assert hosts == sorted([NODES[1], ANY, ANY, gloo]), socks


def test_a_node_that_never_arrives_is_named(model_dirs):
    """Only node 0 of a two-node instance starts: start-up fails within the timeout, naming node 1."""
    port, store = free_port(), free_port()
    args = ["--role", "decode", "--model", str(model_dirs["deepseek_v3"]), "--host", NODES[0]]
    args += ["--port", str(port), "--ep", "4", "--nnodes", "2", "--node-rank", "0"]
    args += ["--dist-init-addr", f"{NODES[0]}:{store}", "--dist-timeout", "5"]
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "services.worker", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode != 0
    assert time.monotonic() - start < 60
    assert "node(s) 1 of 2 did not join the EP4 group" in r.stderr, r.stderr[-2000:]


def test_losing_a_node_takes_the_instance_out(groups):
    """Last in this module: it stops the Qwen3-MoE instance."""
    c, _ = groups
    req = pb.GenerateRequest(
        request_id="long",
        tokenized=pb.TokenizedInput(input_ids=list(range(5, 30))),
        data_parallel_rank=0,  # on node 0, the node that stays
        sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=1500, ignore_eos=True),
        stream=True,
    )
    stream = c.stub("qwen").Generate(req, timeout=120)
    next(stream)
    start = time.monotonic()
    c.procs["qwen-node1"].kill()  # node 1's launcher dies; its ranks die with it
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert time.monotonic() - start < 20  # fails fast, no hang
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert c.procs["qwen-node0"].wait(timeout=30) != 0  # node 0 stops too, non-zero: restart as a unit
