"""The placement planner: DeepSeek EPLB's conventions, its greedy rules done for all layers at once,
and the properties every placement must have, over many random cases."""

from __future__ import annotations

import random

import pytest
import torch

from services.eplb import balancedness, rebalance_experts
from services.eplb.greedy import pack, replicate

CASES = [  # (layers, experts, groups, slots, nodes, gpus)
    (3, 16, 4, 20, 2, 4),
    (2, 16, 4, 16, 1, 4),
    (4, 32, 8, 48, 2, 8),
    (2, 32, 8, 36, 3, 6),  # 8 groups over 3 nodes: the global policy
    (5, 64, 8, 72, 4, 8),
    (2, 24, 6, 30, 1, 15),
]


def loads(layers: int, experts: int, seed: int, skew: float = 1.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(experts, generator=g) for _ in range(layers)]) + 1
    return 1000.0 / ranks.float() ** skew + torch.rand(layers, experts, generator=g)


def reference_replicate(w: list[float], slots: int) -> list[int]:
    count = [1] * len(w)
    out = list(range(len(w)))
    for _ in range(slots - len(w)):
        best = max(range(len(w)), key=lambda e: (w[e] / count[e], -e))
        count[best] += 1
        out.append(best)
    return out


def reference_pack(w: list[float], packs: int, kinds: list[int] | None = None) -> list[int]:
    per = len(w) // packs
    load, used, holds = [0.0] * packs, [0] * packs, [[] for _ in range(packs)]
    where = [0] * len(w)
    for item in sorted(range(len(w)), key=lambda i: -w[i]):  # stable: ties keep index order
        room = [p for p in range(packs) if used[p] < per]
        if kinds is not None:
            fewest = min(holds[p].count(kinds[item]) for p in room)
            room = [p for p in room if holds[p].count(kinds[item]) == fewest]
        target = min(room, key=lambda p: (load[p], p))
        where[item] = target
        load[target] += w[item]
        used[target] += 1
        if kinds is not None:
            holds[target].append(kinds[item])
    return where


def test_the_vectorized_steps_equal_a_plain_loop_per_layer():
    rng = random.Random(0)
    for _ in range(20):
        n, packs = rng.choice([(8, 2), (12, 4), (20, 5), (18, 9)])
        w = torch.rand(3, n, dtype=torch.float64) * 10
        slot2item, _ = replicate(w, n + rng.randrange(0, 6))
        for row in range(3):
            assert slot2item[row].tolist() == reference_replicate(w[row].tolist(), slot2item.shape[1])
        kinds = torch.randint(0, n // 2, (3, n))
        where, rank = pack(w, packs, kinds)
        for row in range(3):
            assert where[row].tolist() == reference_pack(w[row].tolist(), packs, kinds[row].tolist())
            for p in range(packs):  # ranks 0..per-1 within every pack
                assert sorted(rank[row][where[row] == p].tolist()) == list(range(n // packs))


@pytest.mark.parametrize("case", CASES)
def test_every_placement_has_the_documented_shape_and_properties(case):
    layers, experts, groups, slots, nodes, gpus = case
    for seed in range(5):
        w = loads(layers, experts, seed)
        phy2log, log2phy, logcnt = rebalance_experts(w, slots, groups, nodes, gpus)
        assert phy2log.shape == (layers, slots) and logcnt.shape == (layers, experts)
        assert log2phy.shape == (layers, experts, int(logcnt.max()))
        assert (logcnt >= 1).all() and (logcnt.sum(1) == slots).all()  # every expert has a slot
        for layer in range(layers):
            for e in range(experts):
                listed = log2phy[layer, e]
                real = listed[listed >= 0]
                assert len(real) == logcnt[layer, e] and (listed[len(real) :] == -1).all()
                assert (phy2log[layer, real] == e).all()
            # No two replicas of one expert on one GPU unless it has more replicas than GPUs to go to.
            scope = gpus // nodes if groups % nodes == 0 else gpus
            for row in phy2log[layer].view(gpus, -1).tolist():
                for e in set(row):
                    assert row.count(e) <= -(-int(logcnt[layer, e]) // scope)
            if groups % nodes == 0:  # hierarchical: a group's experts (and replicas) stay on one node
                node_of = phy2log[layer].view(nodes, -1)
                for g in range(groups):
                    members = set(range(g * experts // groups, (g + 1) * experts // groups))
                    assert sum(bool(members & set(row.tolist())) for row in node_of) == 1
        again = rebalance_experts(w, slots, groups, nodes, gpus)
        assert all(torch.equal(a, b) for a, b in zip(again, (phy2log, log2phy, logcnt), strict=True))


def test_replicas_balance_skewed_loads():
    w = loads(6, 64, 3, skew=1.0)
    identity = torch.arange(64).repeat(6, 1)
    planned = rebalance_experts(w, 64, 8, 1, 8)[0]  # no spare slots: packing alone
    spare = rebalance_experts(w, 96, 8, 1, 8)[0]
    assert balancedness(w, identity, 8) < balancedness(w, planned, 8) < balancedness(w, spare, 8)
    assert balancedness(w, spare, 8) > 0.95


def test_bad_shapes_are_refused():
    w = loads(1, 16, 0)
    with pytest.raises(ValueError, match="cannot hold"):
        rebalance_experts(w, 12, 4, 1, 4)
    with pytest.raises(ValueError, match="do not split evenly"):
        rebalance_experts(w, 18, 4, 1, 4)
    with pytest.raises(ValueError, match="unknown policy"):
        rebalance_experts(w, 16, 4, 1, 4, policy="best")


@pytest.mark.parametrize("case", [(6, 32, 8, 48, 2, 8), (6, 32, 8, 64, 1, 32)])
def test_an_incremental_re_plan_moves_little_and_stays_within_tolerance(case):
    layers, experts, groups, slots, nodes, gpus = case
    old, new = loads(layers, experts, 1), loads(layers, experts, 1) * (1 + 0.2 * torch.rand(layers, experts))
    current = rebalance_experts(old, slots, groups, nodes, gpus)[0]
    full = rebalance_experts(new, slots, groups, nodes, gpus)[0]
    inc = rebalance_experts(new, slots, groups, nodes, gpus, current=current, tolerance=0.01)[0]
    assert balancedness(new, inc, gpus) >= balancedness(new, full, gpus) - 0.01
    assert (inc != current).sum() <= (full != current).sum()
    same = rebalance_experts(old, slots, groups, nodes, gpus, current=current)[0]
    assert torch.equal(same, current)  # nothing to gain: nothing moves
    phy2log, log2phy, logcnt = rebalance_experts(new, slots, groups, nodes, gpus, current=current)
    assert (logcnt >= 1).all() and (phy2log.gather(1, log2phy[:, :, 0]) == torch.arange(experts)).all()
    with pytest.raises(ValueError, match="current placement"):
        rebalance_experts(new, slots, groups, nodes, gpus, current=current[:, :-1])


def test_noise_aware_plans_ignore_noise_but_follow_real_change():
    """Token counts of two windows of one popularity differ by noise only: nothing moves. Once the
    popularity itself changes, slots move and the balance comes back within tolerance."""
    g = torch.Generator().manual_seed(0)
    popularity = loads(4, 32, 5)
    window = lambda p: torch.poisson(p * 40, generator=g)  # noqa: E731 (token counts of one window)
    shape = (48, 8, 2, 8)
    current = rebalance_experts(window(popularity), *shape)[0]
    same = rebalance_experts(window(popularity), *shape, current=current, counts=True)[0]
    assert torch.equal(same, current)
    changed = window(loads(4, 32, 6))  # another popularity
    moved = rebalance_experts(changed, *shape, current=current, counts=True)[0]
    full = rebalance_experts(changed, *shape)[0]
    assert (moved != current).any()
    slack = float((2 * torch.log(torch.tensor(8.0)) / (changed.sum(1) / 8)).sqrt().mean())
    assert balancedness(changed, moved, 8) >= balancedness(changed, full, 8) - 0.01 - slack
    assert balancedness(changed, moved, 8) > balancedness(changed, current, 8)
