# mypy: allow-redefinition
# (`_fill` rebinds its tensor arguments to the lists of their values)
"""Locality-aware placement: balance like the global policy, touch as few nodes as hierarchical.

The hierarchical policy keeps each expert group on one node, so a token (routed to a few
groups) touches few nodes; but a node's load is then the sum of its groups', which the spare
slots cannot even out. The global policy evens out any load but scatters each token's experts.

`locality` keeps every expert's first slot on its group's node (its home) and spends the spare
slots on replicas wherever the node loads need them, hot experts first. The engine's route
(`services.ep.replica_choice`) then picks, for
each token, replicas on nodes the token visits anyway (the homes of its experts that have no
copy elsewhere), while every replica still receives its even share of the expert's tokens: per
batch, each replica's quota is filled first by the tokens that already visit its node. So a
replica on a foreign node carries load without adding a node to the tokens it serves.
"""

from __future__ import annotations

import torch

from services.ep.measure import replica_counts
from services.eplb.greedy import hierarchical, pack, replicate
from services.eplb.incremental import polish


def locality(
    weight: torch.Tensor, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int
) -> torch.Tensor:
    """phy2log [layers, num_slots], per layer the better of two node layouts, each improved by
    `_balance_nodes`: the hierarchical policy's (groups on nodes, each node's spare slots holding
    replicas of its own experts) and `_fill`'s (the global policy's replica counts, single-slot
    experts on their group's node, replicas where node loads need them); then each node packs its
    slots onto its GPUs."""
    layers, experts = weight.shape
    slots_per_node, gpus_per_node = num_slots // num_nodes, num_gpus // num_nodes
    start = hierarchical(weight, num_slots, num_groups, num_nodes, num_nodes)  # nodes as GPUs
    # each expert's home: the node the hierarchical policy put its group (and all its slots) on
    home = torch.empty(layers, experts, dtype=torch.long)
    home.scatter_(1, start, (torch.arange(num_slots) // slots_per_node).expand(layers, -1))
    _, count = replicate(weight, num_slots)
    rows = []
    for layer in range(layers):
        w = weight[layer]
        filled = _fill(w, home[layer], count[layer], num_nodes, slots_per_node)
        starts = (start[layer].view(num_nodes, -1), filled)
        options = [_balance_nodes(w, held, home[layer]) for held in starts]
        rows.append(min(options, key=lambda held: _node_peak(w, held)))
    node_items = torch.stack(rows).view(layers * num_nodes, slots_per_node)
    count = replica_counts(node_items.view(layers, -1), experts)
    share = (weight / count).repeat_interleave(num_nodes, 0).gather(1, node_items)
    gpu, rank = pack(share, gpus_per_node, kinds=node_items)
    position = gpu * (slots_per_node // gpus_per_node) + rank
    out = torch.empty_like(node_items).scatter_(1, position, node_items).view(layers, num_slots)
    for layer in range(layers):
        out[layer] = polish(weight[layer], out[layer], num_nodes, num_gpus)
    return out


def _node_peak(w: torch.Tensor, held: torch.Tensor) -> float:
    count = torch.bincount(held.flatten(), minlength=w.numel())
    return float((w / count)[held].sum(1).max())


def _fill(
    w: torch.Tensor, home: torch.Tensor, count: torch.Tensor, nodes: int, per_node: int
) -> torch.Tensor:
    """[nodes, per_node] experts: those with one slot at home, then the replicas of the others
    (heaviest first, on distinct nodes while they can) each on the node that needs the most load
    per slot it has left."""
    w, home, count = w.tolist(), home.tolist(), count.tolist()
    target = sum(w) / nodes
    held: list[list[int]] = [[] for _ in range(nodes)]
    load = [0.0] * nodes
    for e, n in enumerate(home):
        if count[e] == 1:
            held[n].append(e)
            load[n] += w[e]
    items = [(w[e] / count[e], e) for e in range(len(w)) if count[e] > 1 for _ in range(count[e])]
    items.sort(reverse=True)
    for size, e in items:
        room = [n for n in range(nodes) if len(held[n]) < per_node]
        fresh = [n for n in room if e not in held[n]] or room
        n = max(fresh, key=lambda n: (target - load[n]) / (per_node - len(held[n])))
        held[n].append(e)
        load[n] += size
    return torch.tensor(held)


def _balance_nodes(
    w: torch.Tensor, held: torch.Tensor, home: torch.Tensor, max_moves: int = 64
) -> torch.Tensor:
    """`held` [nodes, slots per node] (one layer's experts by node) after moves that each lower the
    busiest node's load: a slot on another node stops holding a replica of expert f (which keeps
    one elsewhere: at its `home` node if that is its last) and holds one of an expert e the
    busiest node has. No expert gets two replicas on one node this way, and no replica becomes
    heavier than the heaviest there is."""
    held = held.clone()
    nodes, per = held.shape
    experts = w.numel()
    slot_node = torch.arange(nodes).repeat_interleave(per)
    for _ in range(max_moves):
        flat = held.flatten()
        k = torch.zeros(nodes, experts).index_put_(
            (slot_node, flat), torch.ones(flat.numel()), accumulate=True
        )
        c = k.sum(0)
        share = w / c
        load = (k * share).sum(1)
        a = int(load.argmax())
        peak = load[a]
        cand = (k[a] > 0).nonzero().flatten()  # experts the busiest node holds
        gain = w[cand] / (c[cand] + 1)  # a new replica's load
        d_e = -k[:, cand].T * (share[cand] - gain).unsqueeze(1)  # [C, N]: their replicas get lighter
        f = flat
        cf = c[f]
        heavier = torch.where(cf > 1, w[f] / (cf - 1).clamp_min(1), torch.inf)  # f's replicas after
        d_f = k[:, f].T * (heavier - share[f]).unsqueeze(1)  # [S, N]
        d_f[torch.arange(flat.numel()), slot_node] -= heavier
        new = load + d_e.unsqueeze(1) + d_f.unsqueeze(0)  # [C, S, N]
        new[:, torch.arange(flat.numel()), slot_node] += gain.unsqueeze(1)
        worst = new.max(2).values
        ok = k[slot_node][:, cand].T == 0  # the expert not on the slot's node yet ([C, S])
        ok &= f.unsqueeze(0) != cand.unsqueeze(1)
        last_home = k[home[f], f] - (slot_node == home[f]).float() >= 1  # f keeps a slot at home
        ok &= ((slot_node != a) & ((cf > 2) | ((cf == 2) & last_home)) & (heavier <= share.max())).unsqueeze(
            0
        )
        worst = torch.where(ok, worst, torch.inf)
        best = int(worst.argmin())
        if not float(worst.flatten()[best]) < float(peak) - 1e-6:
            break
        i, y = divmod(best, flat.numel())
        held.view(-1)[y] = cand[i]
    return held
