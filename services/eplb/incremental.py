"""Incremental re-plans: a placement near the one in use that keeps almost all of its balance."""

from __future__ import annotations

import math

import torch

from services.ep.measure import gpu_loads


def incremental(
    weight: torch.Tensor,
    current: torch.Tensor,
    planned: torch.Tensor,
    num_nodes: int,
    num_gpus: int,
    tolerance: float = 0.01,
    counts: bool = False,
) -> torch.Tensor:
    """A placement near `current` for `weight`, given the full re-plan `planned` (phy2log both).

    `counts`: `weight` holds token counts of one window (Poisson noise). A re-plan fitted to
    them looks better on them than it will on the next window by about sqrt(2 ln G / mean GPU
    load) (the largest of G GPUs' noise); that much is added to the tolerance per layer, so
    slots are not moved for noise.

    While the mean balancedness over layers is more than `tolerance` below the re-plan's, the
    layer that loses most is changed: repaired with a few swaps of two slots between GPUs of one
    node (each taking the most load off the busiest GPU) until it is within `tolerance` of its
    re-plan, or, if swaps cannot get there, given the re-plan laid out so that as many slots as
    possible keep their expert (nodes, then GPUs, then slots matched to the current ones holding
    the most of the same experts). Every other layer keeps its placement: nothing moves there.
    """
    weight = weight.float().cpu()
    out = current.clone()
    full = _layer_balance(weight, planned, num_gpus)
    if counts:  # what the re-plan gains only on this window's noise
        mean_load = (weight.sum(1) / num_gpus).clamp_min(1.0)
        full = full - (2 * math.log(max(num_gpus, 2)) / mean_load).sqrt()
    now = _layer_balance(weight, current, num_gpus)
    for layer in (full - now).argsort(descending=True).tolist():  # the layers that lose most first
        if float((full - now).mean()) <= tolerance or float(full[layer] - now[layer]) <= 0:
            break
        target = float(full[layer]) - tolerance
        repaired = _repair(weight[layer], current[layer], num_nodes, num_gpus, target)
        if repaired is None:
            repaired = _align(current[layer], planned[layer], num_nodes, num_gpus, weight.shape[1])
        out[layer] = repaired
        now[layer] = _layer_balance(weight[layer : layer + 1], repaired.unsqueeze(0), num_gpus)[0]
    return out


def _repair(
    weight: torch.Tensor, row: torch.Tensor, nodes: int, gpus: int, target: float, max_swaps: int = 64
) -> torch.Tensor | None:
    """`row` (one layer's phy2log) after swaps of two slots between GPUs of a node, each taking the
    most load off the busiest GPU, until its balancedness reaches `target`; None if it cannot."""
    row, reached = _swaps(weight, row, nodes, gpus, target, max_swaps)
    return row if reached else None


def polish(
    weight: torch.Tensor, row: torch.Tensor, nodes: int, gpus: int, max_swaps: int = 64
) -> torch.Tensor:
    """`row` after the swaps inside nodes that lower its busiest GPU, as long as one does."""
    return _swaps(weight, row, nodes, gpus, 1.0, max_swaps)[0]


def _swaps(
    weight: torch.Tensor, row: torch.Tensor, nodes: int, gpus: int, target: float, max_swaps: int
) -> tuple[torch.Tensor, bool]:
    """(`row` after swaps of two slots between GPUs of one node, each taking the most load off the
    busiest GPU without putting two replicas of an expert on one GPU, whether it reached `target`)."""
    row = row.clone()
    per_gpu = row.numel() // gpus
    count = torch.zeros(weight.numel()).scatter_add_(0, row, torch.ones(row.numel()))
    slot_gpu = torch.arange(row.numel()) // per_gpu
    same_node = (slot_gpu // (gpus // nodes)).unsqueeze(0) == (slot_gpu // (gpus // nodes)).unsqueeze(1)
    for _ in range(max_swaps):
        x = weight[row] / count[row]  # load per slot
        loads = torch.zeros(gpus).scatter_add_(0, slot_gpu, x)
        peak = loads.max()
        if float(loads.mean() / peak) >= target:
            return row, True
        busiest = int(loads.argmax())
        mine = torch.nonzero(slot_gpu == busiest).flatten()  # [k]
        # swapping slot a (busiest GPU) with slot b (another GPU h): new loads of the two GPUs
        delta = x[mine].unsqueeze(1) - x.unsqueeze(0)  # [k, slots]: load moving from busiest to h
        other = loads[slot_gpu].unsqueeze(0) + delta
        worst = torch.maximum(peak - delta, other)
        allowed = same_node[mine] & (slot_gpu != busiest).unsqueeze(0)
        allowed &= row[mine].unsqueeze(1) != row.unsqueeze(0)  # a real change
        holds = torch.zeros(gpus, weight.numel(), dtype=torch.bool)
        holds[slot_gpu, row] = True
        allowed &= ~holds[busiest, row].unsqueeze(0)  # b's expert is not on the busiest GPU yet
        allowed &= ~holds[slot_gpu.unsqueeze(0), row[mine].unsqueeze(1)]  # nor a's on b's GPU
        worst = torch.where(allowed, worst, torch.tensor(float("inf")))
        best = int(worst.argmin())
        a, b = int(mine[best // row.numel()]), best % row.numel()
        if not float(worst.flatten()[best]) < float(peak):
            return row, False  # no swap lowers the peak
        row[a], row[b] = row[b].clone(), row[a].clone()
    return row, False


def _layer_balance(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    loads = gpu_loads(weight, phy2log, num_gpus)
    return loads.mean(1) / loads.max(1).values.clamp_min(1e-12)


def _align(current: torch.Tensor, planned: torch.Tensor, nodes: int, gpus: int, experts: int) -> torch.Tensor:
    """`planned` [slots] with its nodes, GPUs and slots relabelled to agree with `current` most."""
    per_gpu = planned.numel() // gpus
    node_order = _match(current.view(nodes, -1), planned.view(nodes, -1), experts)
    out = []
    for cur_node, new_node in enumerate(node_order):
        cur = current.view(nodes, gpus // nodes, per_gpu)[cur_node]
        new = planned.view(nodes, gpus // nodes, per_gpu)[new_node]
        for cur_gpu, new_gpu in enumerate(_match(cur, new, experts)):
            out.append(_same_slots(cur[cur_gpu].tolist(), new[new_gpu].tolist()))
    return torch.tensor([e for gpu in out for e in gpu], dtype=planned.dtype)


def _match(cur: torch.Tensor, new: torch.Tensor, experts: int) -> list[int]:
    """For each row of `cur` (a group of slots), the row of `new` to put there: largest overlap first."""

    def counts(rows: torch.Tensor) -> torch.Tensor:
        return torch.zeros(rows.shape[0], experts).scatter_add_(
            1, rows, torch.ones(rows.shape, dtype=torch.float)
        )

    overlap = counts(cur) @ counts(new).T  # [cur rows, new rows]
    order = [-1] * cur.shape[0]
    for _ in range(cur.shape[0]):
        flat = int(overlap.argmax())
        i, j = divmod(flat, overlap.shape[1])
        order[i] = j
        overlap[i, :] = -1
        overlap[:, j] = -1
    return order


def _same_slots(cur: list[int], new: list[int]) -> list[int]:
    """`new`'s experts in an order that keeps each expert already in `cur` at its position."""
    out: list[int | None] = [None] * len(cur)
    rest = list(new)
    for i, e in enumerate(cur):
        if e in rest:
            out[i] = e
            rest.remove(e)
    return [e if e is not None else rest.pop(0) for e in out]
