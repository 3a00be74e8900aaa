"""DeepSeek EPLB's greedy steps, vectorized over layers (pure torch, CPU), deterministic.

`replicate` gives every extra slot to the item with the highest load per slot so far; `pack`
places the heaviest item on the lightest pack that still has room; `hierarchical` packs expert
groups onto nodes, then replicates each node's experts into its slots and packs them onto its GPUs.
Each step is the same greedy rule as DeepSeek's, but one step handles every layer at once, so
planning 58 layers costs a few hundred small tensor ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def replicate(weight: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, n] loads -> (slot2item [rows, num_slots], count [rows, n]): every item gets one slot,
    each extra slot goes to the item with the highest load per slot so far."""
    rows, n = weight.shape
    if num_slots < n:
        raise ValueError(f"{num_slots} slots cannot hold {n} experts")
    slot2item = torch.arange(n).repeat(rows, 1)
    count = torch.ones(rows, n, dtype=torch.long)
    extra = []
    ar = torch.arange(rows)
    for _ in range(num_slots - n):
        pick = (weight / count).argmax(dim=1)  # ties: the lowest index
        count[ar, pick] += 1
        extra.append(pick)
    if extra:
        slot2item = torch.cat([slot2item, torch.stack(extra, dim=1)], dim=1)
    return slot2item, count


def pack(
    weight: torch.Tensor, num_packs: int, kinds: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, n] item loads -> (pack [rows, n], rank within the pack [rows, n]) with n / num_packs
    items per pack: heaviest item first, each onto the lightest pack that still has room, among
    those holding the fewest items of its kind (`kinds` [rows, n]: replicas of one expert), so
    replicas spread over packs as far as they can."""
    rows, n = weight.shape
    if n % num_packs:
        raise ValueError(f"{n} items do not split evenly into {num_packs} packs")
    per = n // num_packs
    order = weight.argsort(dim=1, descending=True, stable=True)
    load = torch.zeros(rows, num_packs, dtype=weight.dtype)
    used = torch.zeros(rows, num_packs, dtype=torch.long)
    where = torch.empty(rows, n, dtype=torch.long)
    rank = torch.empty(rows, n, dtype=torch.long)
    ar = torch.arange(rows)
    full = torch.tensor(float("inf"), dtype=weight.dtype)
    copies = None if kinds is None else torch.zeros(rows, num_packs, int(kinds.max()) + 1, dtype=torch.long)
    for i in range(n):
        item = order[:, i]
        room = used < per
        if copies is not None:  # among packs with room, those holding the fewest items of this kind
            kind = kinds[ar, item]  # type: ignore[index]  # copies is only made when kinds is given
            held = torch.where(room, copies[ar, :, kind], n)
            room &= held == held.min(dim=1, keepdim=True).values
        target = torch.where(room, load, full).argmin(dim=1)
        if copies is not None:
            copies[ar, target, kind] += 1
        where[ar, item] = target
        rank[ar, item] = used[ar, target]
        load[ar, target] += weight[ar, item]
        used[ar, target] += 1
    return where, rank


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm))
    return inv


def hierarchical(
    weight: torch.Tensor,
    num_slots: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    pack_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = pack,
) -> torch.Tensor:
    """phy2log [layers, num_slots] with groups kept on nodes (`pack_fn`: the packing rule, for
    comparisons; the global policy is this with one group on one node)."""
    layers, experts = weight.shape
    group_size = experts // num_groups
    slots_per_node, gpus_per_node = num_slots // num_nodes, num_gpus // num_nodes
    # 1. groups onto nodes
    group_node, group_rank = pack_fn(weight.view(layers, num_groups, group_size).sum(-1), num_nodes)
    # node-major order of experts: (node, rank of the group in its node, expert within group)
    expert_pos = ((group_node * (num_groups // num_nodes) + group_rank) * group_size).unsqueeze(-1)
    log2mlog = (expert_pos + torch.arange(group_size)).flatten(-2)  # [L, E]: expert -> position
    mlog2log = _inverse(log2mlog)
    # 2. within each node, replicate its experts into its slots
    node_weight = weight.gather(1, mlog2log).view(-1, experts // num_nodes)  # [L*nodes, E/nodes]
    slot2m, count = replicate(node_weight, slots_per_node)
    # 3. within each node, pack its slots onto its GPUs
    slot_weight = node_weight.gather(1, slot2m) / count.gather(1, slot2m)
    gpu, rank = pack_fn(slot_weight, gpus_per_node, kinds=slot2m)
    position = gpu * (slots_per_node // gpus_per_node) + rank  # slot -> its place in the node
    node_slots = slot2m.gather(1, _inverse(position))  # [L*nodes, slots/node] in place order
    base = (torch.arange(num_nodes) * (experts // num_nodes)).repeat(layers).unsqueeze(-1)
    mlog = (node_slots + base).view(layers, num_slots)
    return mlog2log.gather(1, mlog)
