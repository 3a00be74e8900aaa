"""Live rebalancing: an EP4 instance switches expert placement in the middle of a generation;
only changed slots move, every rank switches at the same step, and the answer stays exact."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
import torch
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from services.eplb.files import write_placement
from services.proto.moeserve.v1 import worker_control_pb2 as ctl
from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc
from tests.cluster import LocalCluster
from tests.oracle import encode, greedy_ids


@pytest.fixture(scope="module")
def ep4(ds_dir):
    c = LocalCluster()
    try:
        c.worker("ep4", "decode", ds_dir, "--ep", "4", "--ep-slots", "20")
        yield c
    finally:
        c.stop()


def control(c: LocalCluster) -> ctl_grpc.WorkerControlStub:
    return ctl_grpc.WorkerControlStub(grpc.insecure_channel(c.addresses["ep4"]))


def test_a_switch_mid_generation_keeps_the_answer_exact(ep4, ds_dir):
    prompt = encode(ds_dir, "Experts move between ranks while tokens keep coming")
    request = pb.GenerateRequest(
        request_id="moving", tokenized=pb.TokenizedInput(input_ids=prompt), stream=True,
        sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=150),
    )  # fmt: skip
    stream = ep4.stub("ep4").Generate(request, timeout=120)
    tokens = []
    for response in stream:
        tokens += list(response.chunk.token_ids) if response.HasField("chunk") else []
        if len(tokens) >= 5:
            break
    before = control(ep4).GetExpertLoad(ctl.GetExpertLoadRequest(), timeout=10)
    layers, slots = len(before.layers), before.num_slots
    current = [list(before.phy2log[i * slots : (i + 1) * slots]) for i in range(layers)]
    moved = [row[7:] + row[:7] for row in current]  # most slots change, most across ranks
    res = control(ep4).Rebalance(ctl.RebalanceRequest(phy2log=[e for row in moved for e in row]), timeout=60)
    assert res.version == before.placement_version + 1
    assert res.slots_changed == sum(
        a != b for r, m in zip(current, moved, strict=True) for a, b in zip(r, m, strict=True)
    )
    for response in stream:  # the same generation goes on under the new placement
        if response.HasField("chunk"):
            tokens += list(response.chunk.token_ids)
    assert tokens == greedy_ids(ds_dir, prompt, 150)
    after = control(ep4).GetExpertLoad(ctl.GetExpertLoadRequest(), timeout=10)
    assert list(after.phy2log) == [e for row in moved for e in row] and after.placement_version == res.version


def test_a_planned_switch_and_bad_placements(ep4, ds_dir):
    prompt = encode(ds_dir, "a short warm-up")
    request = pb.GenerateRequest(
        request_id="warm", tokenized=pb.TokenizedInput(input_ids=prompt),
        sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=4),
    )  # fmt: skip
    list(ep4.stub("ep4").Generate(request, timeout=60))
    version = control(ep4).GetExpertLoad(ctl.GetExpertLoadRequest(), timeout=10).placement_version
    planned = control(ep4).Rebalance(ctl.RebalanceRequest(), timeout=60)  # from the load window
    assert (
        planned.version == version + 1 and planned.balancedness_after >= planned.balancedness_before - 0.011
    )
    for bad, fragment in (([1, 2, 3], "entries"), ([0] * 40, "cannot be served")):
        with pytest.raises(grpc.RpcError) as e:
            control(ep4).Rebalance(ctl.RebalanceRequest(phy2log=bad), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in e.value.details()
    assert list(ep4.stub("ep4").Generate(request, timeout=60))[-1].complete.output_ids == greedy_ids(
        ds_dir, prompt, 4
    )


def test_the_cli_switches_to_a_placement_file(ep4, tmp_path):
    now = control(ep4).GetExpertLoad(ctl.GetExpertLoadRequest(), timeout=10)
    slots = now.num_slots
    rows = torch.tensor(list(now.phy2log)).view(-1, slots).roll(3, dims=1)
    write_placement(tmp_path / "p.json", rows, now.num_experts, now.ep_size)
    run = subprocess.run(
        [sys.executable, "-m", "services.eplb", "rebalance", "--instance", ep4.addresses["ep4"],
         "--placement", str(tmp_path / "p.json")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0 and f"switched to placement {now.placement_version + 1}" in run.stdout, (
        run.stderr
    )
    after = control(ep4).GetExpertLoad(ctl.GetExpertLoadRequest(), timeout=10)
    assert list(after.phy2log) == rows.flatten().tolist()


def test_a_periodic_rebalance_follows_the_load(ds_dir):
    """`--eplb-interval`: the instance re-plans from its window and switches, with no request failing."""
    c = LocalCluster()
    try:
        c.worker("timed", "decode", ds_dir, "--ep", "2", "--ep-slots", "20", "--eplb-interval", "0.5",
                 "--eplb-tolerance", "0")  # fmt: skip
        prompt = encode(ds_dir, "traffic that skews the experts")
        request = pb.GenerateRequest(
            request_id="t0", tokenized=pb.TokenizedInput(input_ids=prompt),
            sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=40),
        )  # fmt: skip
        expected = greedy_ids(ds_dir, prompt, 40)
        stub = ctl_grpc.WorkerControlStub(grpc.insecure_channel(c.addresses["timed"]))
        deadline = time.monotonic() + 30
        n = 0
        while stub.GetExpertLoad(ctl.GetExpertLoadRequest(), timeout=10).placement_version == 0:
            assert time.monotonic() < deadline, "no periodic switch within 30 s"
            n += 1
            request.request_id = f"t{n}"
            (done,) = [r.complete for r in c.stub("timed").Generate(request, timeout=60)]
            assert list(done.output_ids) == expected
        (done,) = [r.complete for r in c.stub("timed").Generate(request, timeout=60)]
        assert list(done.output_ids) == expected  # and after the switch
    finally:
        c.stop()
