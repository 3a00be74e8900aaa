"""Which replica a token's expert choice goes to, where an expert has replicas on several nodes.

A placement from the `locality` policy (`services.eplb.locality`) keeps single-slot experts on
their group's node and puts replicas wherever node loads need them. `route` picks, for each
token, replicas on nodes the token visits anyway (the homes of its experts that have no copy
elsewhere), while every replica still receives its even share of the expert's tokens: per batch,
each replica's quota is filled first by the tokens that already visit its node. So a replica on
a foreign node carries load without adding a node to the tokens it serves.
"""

from __future__ import annotations

import torch


def route(
    ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, slot_node: torch.Tensor
) -> torch.Tensor:
    """Logical experts [T, K] -> slots [T, K] for one layer (`log2phy` [E, W], `logcnt` [E],
    `slot_node` [S]).

    An expert whose replicas all sit on one node is served by them in turn (as the plain route
    does); its node is one the token visits. The replicas of an expert spread over nodes each take
    an even share of its tokens in this batch (the floor of it), filled first by tokens that visit
    the replica's node and have the fewest other such replicas; a token left over (fewer than the
    replicas, per expert) takes a replica on a node it visits if there is one, else its turn."""
    t, k = ids.shape
    pair_slots = log2phy[ids].reshape(t * k, log2phy.shape[1])  # [P, W], -1 padded
    width = pair_slots.shape[1]
    valid = pair_slots >= 0
    nodes = torch.where(valid, slot_node[pair_slots.clamp_min(0)], -1)  # [P, W]
    pinned = (~valid | (nodes == nodes[:, :1])).all(1)  # every replica on one node
    token = torch.arange(t).repeat_interleave(k)
    turn = (token + torch.arange(k).repeat(t)) % logcnt[ids.flatten()]
    out = pair_slots.gather(1, turn.unsqueeze(1)).squeeze(1)
    flexible = (~pinned).nonzero().flatten()
    if flexible.numel() == 0:
        return out.view(t, k)
    visits = torch.zeros(t, int(slot_node[-1]) + 1, dtype=torch.bool)
    visits[token[pinned], nodes[pinned, 0]] = True
    ids_f, slots_f, valid_f = ids.flatten()[flexible], pair_slots[flexible], valid[flexible]
    seen = visits[token[flexible].unsqueeze(1), nodes[flexible].clamp_min(0)] & valid_f  # [F, W]
    quota = torch.bincount(ids_f, minlength=log2phy.shape[0])[ids_f] // logcnt[ids_f]
    left = torch.ones(flexible.numel(), dtype=torch.bool)
    span = 4 * (width + 1)
    for j in range(width):
        has = valid_f[:, j] & left
        options = (seen & left.unsqueeze(1))[:, j:].sum(1)
        # within each expert: pairs this replica may take, those visiting its node, fewest options
        key = ((~has).long() * 2 + (~seen[:, j]).long()) * (width + 1) + options
        order = torch.argsort(ids_f * span + key, stable=True)
        sorted_e = ids_f[order]
        nth = torch.empty_like(order)
        nth[order] = torch.arange(order.numel()) - torch.searchsorted(sorted_e, sorted_e)
        take = has & (nth < quota)
        out[flexible[take]] = slots_f[take, j]
        left &= ~take
    rest = left.nonzero().flatten()
    if rest.numel():
        seen_r = seen[rest]
        n_seen = seen_r.sum(1)
        r = token[flexible[rest]] % n_seen.clamp_min(1)
        nth_seen = (seen_r.cumsum(1) == (r + 1).unsqueeze(1)) & seen_r
        pick = torch.where(n_seen > 0, nth_seen.float().argmax(1), turn[flexible[rest]])
        out[flexible[rest]] = slots_f[rest].gather(1, pick.unsqueeze(1)).squeeze(1)
    return out.view(t, k)
