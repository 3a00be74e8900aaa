"""Switching a running group to a new expert placement: only the slots that change move.

Every rank knows the old and the new `phys_to_log`, so every rank computes the same moves: each
slot whose expert changes gets that expert's weights from a slot that holds it now (one on its
own rank when there is one, else the lowest such slot). Local moves are copies; the others go
rank to rank, one `all_to_all_single` per MoE layer and weight tensor, only for layers where
something moves. It runs between two steps on every rank at once (the group agrees on the step
in `ExpertParallel.group_has_work`), then the placement is swapped: the next forward routes
with the new map and finds the weights in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.distributed as dist
from torch import nn

from services.ep.placement import ExpertPlacement

Move = tuple[int, int]
"""(destination slot, source slot), global slot ids."""


def plan_moves(old: torch.Tensor, new: torch.Tensor, ep_size: int) -> list[list[Move]]:
    """Per layer, the slots whose expert changes and where each gets its weights from."""
    layers, slots = old.shape
    per_rank = slots // ep_size
    moves: list[list[Move]] = []
    for layer in range(layers):
        o, n = old[layer].tolist(), new[layer].tolist()
        holders: dict[int, list[int]] = {}
        for slot, expert in enumerate(o):
            holders.setdefault(expert, []).append(slot)
        out = []
        for dst, expert in enumerate(n):
            if o[dst] == expert:
                continue
            if expert not in holders:
                raise ValueError(f"layer {layer}: expert {expert} is held by no slot now; cannot fetch it")
            here = [s for s in holders[expert] if s // per_rank == dst // per_rank]
            out.append((dst, (here or holders[expert])[0]))
        moves.append(out)
    return moves


def switch(
    blocks: Sequence[nn.Module],
    current: ExpertPlacement,
    new: ExpertPlacement,
    rank: int,
    group: dist.ProcessGroup | None,
) -> int:
    """Move the changed slots' weights into this rank's `blocks` (MoE blocks in layer order) and
    return how many of this rank's slots changed. A collective: every rank of the group calls it."""
    per_rank = current.slots_per_rank
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    changed = 0
    for block, moves in zip(
        blocks, plan_moves(current.phys_to_log, new.phys_to_log, current.ep_size), strict=True
    ):
        if not moves:
            continue
        for weight in _slot_tensors(cast(nn.Module, block.experts)):  # a MoE block's experts module
            _move(weight, moves, rank, per_rank, current.ep_size, group)
        changed += sum(1 for dst, _ in moves if dst in mine)
    return changed


def _slot_tensors(experts: nn.Module) -> list[torch.Tensor]:
    """The expert module's per-slot tensors (weights, and block scales when kept in FP8)."""
    names = ("w13", "w2", "w13_scale_inv", "w2_scale_inv")
    return [getattr(experts, n).data for n in names if hasattr(experts, n)]


def _move(
    weight: torch.Tensor,
    moves: list[Move],
    rank: int,
    per_rank: int,
    ranks: int,
    group: dist.ProcessGroup | None,
) -> None:
    """Apply `moves` to one per-slot tensor [local slots, ...] of this rank."""
    owner: Callable[[int], int] = lambda slot: slot // per_rank  # noqa: E731
    local: Callable[[int], int] = lambda slot: slot % per_rank  # noqa: E731
    # Everything is read before anything is written: a slot may be a source and a destination.
    sends = [[src for dst, src in moves if owner(src) == rank and owner(dst) == r] for r in range(ranks)]
    recvs = [[dst for dst, src in moves if owner(dst) == rank and owner(src) == r] for r in range(ranks)]
    rows = [weight[local(s)] for r in range(ranks) if r != rank for s in sends[r]]
    send = torch.stack(rows) if rows else weight.new_empty((0, *weight.shape[1:]))
    copies = [
        (local(dst), weight[local(src)].clone()) for dst, src in moves if owner(dst) == rank == owner(src)
    ]
    if ranks > 1:
        recv = weight.new_empty((sum(len(recvs[r]) for r in range(ranks) if r != rank), *weight.shape[1:]))
        send_counts = [0 if r == rank else len(sends[r]) for r in range(ranks)]
        recv_counts = [0 if r == rank else len(recvs[r]) for r in range(ranks)]
        dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=group)
        arrived = iter(recv)
        for r in range(ranks):
            if r != rank:
                for dst in recvs[r]:
                    weight[local(dst)] = next(arrived)
    for dst, value in copies:
        weight[dst] = value
