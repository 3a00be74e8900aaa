"""Dispatcher conformance: every backend available here runs the same checks on real processes."""

from __future__ import annotations

import pytest
import torch

from services.ep import create
from tests.ranks import run_ranks

SLOTS_PER_RANK = 3
K = 4
HIDDEN = 8
CASES = ("uneven", "empty_rank", "all_empty", "duplicates", "one_rank_has_all")


def case_inputs(rank: int, world: int, case: str):
    g = torch.Generator().manual_seed(1000 * rank + CASES.index(case))
    tokens = {
        "uneven": 3 + 5 * rank,
        "empty_rank": 0 if rank == 1 else 6,
        "all_empty": 0,
        "duplicates": 5,
        "one_rank_has_all": 40 if rank == 0 else 0,
    }[case]
    slots_total = SLOTS_PER_RANK * world
    x = torch.randn(tokens, HIDDEN, generator=g)
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


def conformance(rank: int, world: int, backend: str):
    d = create(backend)
    # DeepEP moves bf16 rows between GPUs; the torch backend is checked in fp32 on CPU.
    device, dtype, tol = (
        ("cuda", torch.bfloat16, 3e-2) if backend == "deepep" else ("cpu", torch.float32, 1e-5)
    )
    results = {}
    for case in CASES:
        x, slots, weights = (t.to(device) for t in case_inputs(rank, world, case))
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
            assert res[case][0] and res[case][1], case
        assert res["any"] == (True, False)
