"""The locality policy and its route: nodes as balanced as the global policy's, tokens visiting no
more nodes than under the hierarchical policy, every replica taking its share of the tokens."""

from __future__ import annotations

import pytest
import torch

from services.ep.placement import ExpertPlacement, PlacementError
from services.ep.replica_choice import route
from services.eplb import balancedness, rebalance_experts

CASES = [  # (layers, experts, groups, slots, nodes, gpus)
    (3, 32, 8, 40, 2, 4),
    (2, 64, 8, 72, 4, 8),
    (2, 48, 6, 60, 3, 6),
    (2, 32, 4, 48, 4, 8),
]


def popularity(layers: int, experts: int, seed: int, skew: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(experts, generator=g) for _ in range(layers)]) + 1
    return ranks.float() ** -skew


def tokens(pop: torch.Tensor, groups: int, n: int, seed: int, top_groups: int = 4, top_k: int = 8):
    """(weight [L, E], chosen experts [L, n, top_k]): DeepSeek-style group-limited routing."""
    g = torch.Generator().manual_seed(seed)
    layers, experts = pop.shape
    weight, chosen = torch.zeros(layers, experts), []
    for layer in range(layers):
        u = torch.rand(n, experts, generator=g).clamp_min(1e-20)
        scores = (pop[layer].log() - (-u.log()).log()).view(n, groups, -1)
        best = scores.topk(2, dim=-1).values.sum(-1).topk(top_groups, dim=-1).indices
        keep = torch.zeros(n, groups, dtype=torch.bool).scatter_(1, best, True)
        ids = (
            scores.masked_fill(~keep.unsqueeze(-1), float("-inf"))
            .view(n, experts)
            .topk(top_k, dim=-1)
            .indices
        )
        weight[layer] = torch.bincount(ids.flatten(), minlength=experts).float()
        chosen.append(ids)
    return weight, torch.stack(chosen)


def nodes_per_token(
    phy2log: torch.Tensor, chosen: torch.Tensor, experts: int, nodes: int, gpus: int
) -> float:
    placement = ExpertPlacement(experts, gpus, phy2log, nodes)
    per_node = phy2log.shape[1] // nodes
    total = 0.0
    for layer in range(phy2log.shape[0]):
        node = (placement.route(layer, chosen[layer]) // per_node).sort(1).values
        total += float((1 + (node[:, 1:] != node[:, :-1]).sum(1)).float().mean())
    return total / phy2log.shape[0]


@pytest.mark.parametrize("case", CASES)
def test_locality_placements_have_the_documented_properties(case):
    layers, experts, groups, slots, nodes, gpus = case
    per_gpu, gpus_per_node = slots // gpus, gpus // nodes
    for seed in range(3):
        w = popularity(layers, experts, seed, 1.0) * 1000 + torch.rand(layers, experts)
        phy2log, log2phy, logcnt = rebalance_experts(w, slots, groups, nodes, gpus, "locality")
        assert phy2log.shape == (layers, slots) and (logcnt >= 1).all() and (logcnt.sum(1) == slots).all()
        assert (phy2log.gather(1, log2phy[:, :, 0]) == torch.arange(experts)).all()
        for layer in range(layers):
            by_node = phy2log[layer].view(nodes, -1).tolist()
            # an expert's replicas on one node sit on distinct GPUs while the node has enough
            for row in by_node:
                for gpu in range(gpus_per_node):
                    held = row[gpu * per_gpu : (gpu + 1) * per_gpu]
                    for e in set(held):
                        assert held.count(e) <= -(-row.count(e) // gpus_per_node)
            # experts with one slot stay with their group: one node per group for those
            single = [e for e in range(experts) if logcnt[layer, e] == 1]
            for g in range(groups):
                members = {e for e in single if e * groups // experts == g}
                assert sum(bool(members & set(row)) for row in by_node) <= 1
        again = rebalance_experts(w, slots, groups, nodes, gpus, "locality")
        assert torch.equal(again[0], phy2log)


def test_locality_balances_nodes_and_keeps_tokens_on_few_of_them():
    """DeepSeek-V3's routing shape (top-4 of 8 groups, top-8 experts) over 4 nodes."""
    layers, experts, groups, slots, nodes, gpus = 4, 64, 8, 80, 4, 16
    for skew in (0.6, 1.0):
        pop = popularity(layers, experts, 7, skew)
        w, chosen = tokens(pop, groups, 4096, seed=1)
        hier = rebalance_experts(w, slots, groups, nodes, gpus, "hierarchical")[0]
        local = rebalance_experts(w, slots, groups, nodes, gpus, "locality")[0]
        glob = rebalance_experts(w, slots, groups, nodes, gpus, "global")[0]
        assert balancedness(w, local, gpus) > balancedness(w, hier, gpus) + 0.02
        assert balancedness(w, local, gpus) > 0.97
        spread = {
            p: nodes_per_token(x, chosen, experts, nodes, gpus)
            for p, x in [("h", hier), ("l", local), ("g", glob)]
        }
        assert spread["l"] <= spread["h"] < spread["g"]


def test_route_gives_every_replica_its_share_and_prefers_visited_nodes():
    # 2 nodes x 2 slots: expert 0 on both nodes; expert 1 only on node 0, expert 2 only on node 1
    placement = ExpertPlacement(3, 2, torch.tensor([[0, 1, 0, 2]]), num_nodes=2)
    ids = torch.tensor([[0, 1]] * 6 + [[0, 2]] * 6)
    slots = placement.route(0, ids)
    assert (placement.phys_to_log[0][slots] == ids).all()
    assert slots[:6, 0].tolist() == [0] * 6 and slots[6:, 0].tolist() == [2] * 6  # each on its node
    # lopsided: 9 tokens visit node 0, 3 node 1: expert 0's replicas still split 6 / 6
    ids = torch.tensor([[0, 1]] * 9 + [[0, 2]] * 3)
    slots = placement.route(0, ids)[:, 0]
    assert torch.bincount(slots, minlength=4)[[0, 2]].tolist() == [6, 6]
    assert slots[9:].tolist() == [2] * 3  # node 1's tokens get node 1's replica
    # a token left over (fewer than the replicas) takes the one on its node
    assert placement.route(0, torch.tensor([[0, 2]])).tolist() == [[2, 3]]
    assert placement.route(0, torch.zeros(0, 2, dtype=torch.long)).shape == (0, 2)  # an idle step


def test_route_shares_are_even_for_random_batches():
    g = torch.Generator().manual_seed(3)
    phy2log = torch.tensor([0, 1, 2, 3, 0, 4, 5, 0, 6, 7, 1, 0])  # 4 nodes of 3 slots
    log2phy, cnt = ExpertPlacement(8, 4, phy2log.unsqueeze(0)).log_to_phys[0], None
    cnt = torch.bincount(phy2log, minlength=8)
    ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(101)])
    slots = route(ids, log2phy, cnt, torch.arange(12) // 3)
    assert (phy2log[slots] == ids).all()
    for e in (0, 1):
        got = torch.bincount(slots[ids == e], minlength=12)[log2phy[e][log2phy[e] >= 0]]
        n = int((ids == e).sum())
        assert int(got.min()) >= n // int(cnt[e]) and int(got.sum()) == n


def test_one_node_routes_in_turn_and_nodes_must_divide_the_ranks():
    placement = ExpertPlacement(2, 2, torch.tensor([[0, 1, 0, 0]]))
    assert placement.route(0, torch.tensor([[0], [0], [0]])).flatten().tolist() == [0, 2, 3]
    with pytest.raises(PlacementError, match="nodes"):
        ExpertPlacement(2, 2, torch.tensor([[0, 1, 0, 0]]), num_nodes=3)
