"""Dispatcher conformance: every backend available here runs the same checks on real processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from services.ep import create
from tests.ranks import run_ranks

SLOTS_PER_RANK = 3
K = 4
HIDDEN = 8
CASES = ("uneven", "empty_rank", "all_empty", "duplicates", "one_rank_has_all")
DEEPEP_FORBIDS = ("duplicates",)
"""Skipped for DeepEP: its kernels need one token's experts to be distinct (our router never repeats one)."""
DOUBLES = Path(__file__).resolve().parents[2] / "doubles"


def case_inputs(rank: int, world: int, case: str, hidden: int = HIDDEN):
    g = torch.Generator().manual_seed(1000 * rank + CASES.index(case))
    tokens = {
        "uneven": 3 + 5 * rank,
        "empty_rank": 0 if rank == 1 else 6,
        "all_empty": 0,
        "duplicates": 5,
        "one_rank_has_all": 40 if rank == 0 else 0,
    }[case]
    slots_total = SLOTS_PER_RANK * world
    x = torch.randn(tokens, hidden, generator=g)
    if case == "duplicates":
        # Several choices on the same rank, and the same slot chosen twice.
        slots = torch.tensor([[0, 1, 2, 0]] * tokens) % slots_total
    else:
        slots = (
            torch.stack([torch.randperm(slots_total, generator=g)[:K] for _ in range(tokens)])
            if tokens
            else torch.zeros(0, K, dtype=torch.long)
        )
    weights = torch.rand(tokens, K, generator=g)
    return x, slots, weights


def conformance(rank: int, world: int, backend: str, double: bool = False):
    if double:  # the contract double of deep_ep 2.1 stands in for DeepEP (gloo on CPU)
        sys.path.insert(0, str(DOUBLES))
    d = create(backend)
    # DeepEP moves bf16 rows (hidden a multiple of 256); the torch backend is checked in fp32.
    device, dtype, tol, hidden = (
        ("cpu" if double else "cuda", torch.bfloat16, 3e-2, 256)
        if backend == "deepep"
        else ("cpu", torch.float32, 1e-5, HIDDEN)
    )
    d.setup(hidden, K)  # start-up: communication buffers
    results = {}
    for case in CASES:
        if backend == "deepep" and case in DEEPEP_FORBIDS:
            continue
        x, slots, weights = (t.to(device) for t in case_inputs(rank, world, case, hidden))
        x = x.to(dtype)
        got = d.dispatch(x, slots, weights, SLOTS_PER_RANK)
        # This rank's "experts": slot s multiplies by (s + 1); partial outputs weighted here.
        glob = torch.where(got.local_slots >= 0, got.local_slots + rank * SLOTS_PER_RANK, -1)
        scale = ((glob + 1).float() * got.weights * (got.local_slots >= 0)).sum(1, keepdim=True)
        out = d.combine(got.x * scale, got.handle)
        expected = x * ((slots + 1).float() * weights).sum(1, keepdim=True)
        # Each received row: a token sent once to this rank, holding only this rank's choices.
        assert ((got.local_slots == -1) | (got.local_slots < SLOTS_PER_RANK)).all()
        assert ((got.local_slots >= 0).sum(1) >= 1).all()
        close = torch.allclose(out.float(), expected.float(), atol=tol, rtol=tol)
        results[case] = (close, out.shape == x.shape, got.x.shape[0])
    results["any"] = (d.any(rank == world - 1), d.any(False))
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_torch_dispatcher_conformance(world):
    for rank, res in enumerate(run_ranks(world, conformance, "torch")):
        for case in CASES:
            close, shape_ok, _ = res[case]
            assert close and shape_ok, f"rank {rank}, case {case}"
        assert res["any"] == (True, False)
        assert res["all_empty"][2] == 0


@pytest.mark.gpu
def test_deepep_dispatcher_conformance():
    pytest.importorskip("deep_ep")
    if torch.cuda.device_count() < 2:
        pytest.skip("gpu test: DeepEP needs at least 2 GPUs")
    for res in run_ranks(2, conformance, "deepep", backend="nccl"):
        for case in CASES:
            if case in DEEPEP_FORBIDS:
                continue
            assert res[case][0] and res[case][1], case
        assert res["any"] == (True, False)
    for res in run_ranks(2, expanded_conformance, "cuda", backend="nccl"):
        for case in CASES:
            if case not in DEEPEP_FORBIDS:
                assert res[case][0] and res[case][1], case


@pytest.mark.parametrize("world", [2, 4])
def test_deepep_backend_against_the_contract_double(world):
    """The deepep backend's calls, checked against tests/doubles/deep_ep (DeepEP 2.1's contract)."""
    for rank, res in enumerate(run_ranks(world, conformance, "deepep", True)):
        for case in CASES:
            if case in DEEPEP_FORBIDS:
                continue
            close, shape_ok, _ = res[case]
            assert close and shape_ok, f"rank {rank}, case {case}"
        assert res["any"] == (True, False)


def double_rejects(rank: int, world: int) -> dict[str, str]:
    """Feed the double what DeepEP rejects; every rank gets the same bad input, so none hangs."""
    sys.path.insert(0, str(DOUBLES))
    import deep_ep
    import torch.distributed as dist

    from services.ep.deepep import DeepEPLimit

    buf = deep_ep.ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=4, hidden=256, num_topk=2)
    idx = torch.tensor([[0, 1], [1, 2]], dtype=deep_ep.topk_idx_t)
    w = torch.ones(2, 2)
    bad = {
        "float32": dict(x=torch.zeros(2, 256), topk_idx=idx),
        "hidden 8": dict(x=torch.zeros(2, 8, dtype=torch.bfloat16), topk_idx=idx),
        "over the cap": dict(x=torch.zeros(5, 256, dtype=torch.bfloat16), topk_idx=idx.repeat(3, 1)[:5]),
        "non-contiguous topk_idx": dict(
            x=torch.zeros(2, 256, dtype=torch.bfloat16), topk_idx=idx.t().contiguous().t()
        ),
        "repeated expert": dict(
            x=torch.zeros(2, 256, dtype=torch.bfloat16), topk_idx=torch.tensor([[1, 1], [0, 2]])
        ),
    }
    out = {}
    for name, args in bad.items():
        n = args["x"].shape[0]
        try:
            buf.dispatch(topk_weights=w[:1].expand(n, 2).contiguous(), num_experts=2 * world, **args)
            out[name] = "accepted"
        except AssertionError:
            out[name] = "rejected"
    d = create("deepep")
    for name, (hidden, dtype) in {
        "backend float32": (256, "float32"),
        "backend hidden": (64, "bfloat16"),
    }.items():
        try:
            d.validate(hidden, dtype, 2 * world)
            out[name] = "accepted"
        except DeepEPLimit as e:
            out[name] = str(e)
    return out


def test_the_double_rejects_what_deepep_rejects():
    for res in run_ranks(2, double_rejects):
        assert {k: v for k, v in res.items() if not k.startswith("backend")} == dict.fromkeys(
            ("float32", "hidden 8", "over the cap", "non-contiguous topk_idx", "repeated expert"), "rejected"
        )
        assert "bfloat16 rows only" in res["backend float32"]
        assert "multiple of 256" in res["backend hidden"] and "64" in res["backend hidden"]


DECODE_CAP = 48
"""Per-rank token cap of the expanded calls below (the largest case has 40 tokens on a rank)."""


def expanded_conformance(rank: int, world: int, device: str = "cpu"):
    if device == "cpu":
        sys.path.insert(0, str(DOUBLES))
    d = create("deepep", max_tokens_per_rank=DECODE_CAP, decode_tokens_per_rank=DECODE_CAP)
    d.setup(256, K)
    results = {}
    for case in CASES:
        if case in DEEPEP_FORBIDS:
            continue
        x, slots, weights = (t.to(device) for t in case_inputs(rank, world, case, 256))
        x = x.to(torch.bfloat16)
        got = d.dispatch_expanded(x, slots, weights, SLOTS_PER_RANK)
        # Row r belongs to local slot s where offsets[s-1] <= r < offsets[s]; that slot's "expert"
        # multiplies by its global id + 1. Padding rows (past offsets[-1]) must never be read.
        rows = torch.arange(got.x.shape[0], device=device)
        local = torch.bucketize(rows, got.offsets.long(), right=True)  # [R]
        y = got.x.float() * ((local + rank * SLOTS_PER_RANK + 1) * got.weights)[:, None]
        out = d.combine_expanded(y, got.handle)
        expected = x.float() * ((slots + 1).float() * weights).sum(1, keepdim=True)
        close = torch.allclose(out.float(), expected, atol=3e-2, rtol=3e-2)
        results[case] = (close, out.shape == x.shape, got.x.shape[0], int(got.offsets[-1]), slots.numel())
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_deepep_expanded_layout_against_the_contract_double(world):
    """Decode's layout: rows grouped per local slot in worst-case buffers, sizes only on the device."""
    res = run_ranks(world, expanded_conformance)
    worst = world * DECODE_CAP * min(K, SLOTS_PER_RANK)
    for case in CASES:
        if case in DEEPEP_FORBIDS:
            continue
        for rank, r in enumerate(res):
            close, shape_ok, allocated, _, _ = r[case]
            assert close and shape_ok, f"rank {rank}, case {case}"
            # The same shape whatever arrived: nothing about the data reached the host.
            assert allocated == worst, (case, allocated)
        # Every (token, choice) pair lands in exactly one row somewhere.
        assert sum(r[case][3] for r in res) == sum(r[case][4] for r in res), case
