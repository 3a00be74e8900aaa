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
    ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    slot_node: torch.Tensor,
    num_nodes: int | None = None,
) -> torch.Tensor:
    """Logical experts [T, K] -> slots [T, K] for one layer (`log2phy` [E, W], `logcnt` [E],
    `slot_node` [S], all on the device of `ids`; `num_nodes`: the nodes the slots span, known on
    the host; None reads it from `slot_node`, a host sync).

    An expert whose replicas all sit on one node is served by them in turn (as the plain route
    does); its node is one the token visits. The replicas of an expert spread over nodes each take
    an even share of its tokens in this batch (the floor of it), filled first by tokens that visit
    the replica's node and have the fewest other such replicas; a token left over (fewer than the
    replicas, per expert) takes a replica on a node it visits if there is one, else its turn.

    Every step is a masked tensor op over all (token, choice) pairs, with no data-dependent shape
    and no read to the host, so it runs as it is queued on a GPU."""
    t, k = ids.shape
    device = ids.device
    nodes_n = int(slot_node[-1]) + 1 if num_nodes is None else num_nodes
    flat = ids.reshape(-1)  # [P]
    pair_slots = log2phy[ids].reshape(t * k, log2phy.shape[1])  # [P, W], -1 padded
    width = pair_slots.shape[1]
    valid = pair_slots >= 0
    nodes = torch.where(valid, slot_node[pair_slots.clamp_min(0)], -1)  # [P, W]
    pinned = (~valid | (nodes == nodes[:, :1])).all(1)  # [P] every replica on one node
    token = torch.arange(t, device=device).repeat_interleave(k)  # [P]
    turn = (token + torch.arange(k, device=device).repeat(t)) % logcnt[flat]  # [P]
    out = pair_slots.gather(1, turn.unsqueeze(1)).squeeze(1)  # [P]
    flexible = ~pinned
    # nodes each token visits anyway: the homes of its experts whose replicas share one node
    visits = torch.zeros(t, nodes_n, dtype=torch.long, device=device)
    visits.index_put_((token, nodes[:, 0].clamp_min(0)), pinned.long(), accumulate=True)
    seen = (visits > 0)[token.unsqueeze(1), nodes.clamp_min(0)] & valid & flexible.unsqueeze(1)  # [P, W]
    per_expert = torch.zeros(log2phy.shape[0], dtype=torch.long, device=device)
    per_expert.index_add_(0, flat, flexible.long())  # flexible pairs per expert
    quota = per_expert[flat] // logcnt[flat]  # [P] each replica's even share
    left = flexible.clone()
    span = 4 * (width + 1)
    position = torch.arange(t * k, device=device)
    for j in range(width):
        has = valid[:, j] & left
        options = (seen & left.unsqueeze(1))[:, j:].sum(1)
        # within each expert: pairs this replica may take, those visiting its node, fewest options
        key = ((~has).long() * 2 + (~seen[:, j]).long()) * (width + 1) + options
        order = torch.argsort(flat * span + key, stable=True)
        sorted_e = flat[order]
        nth = torch.empty_like(order)
        nth[order] = position - torch.searchsorted(sorted_e, sorted_e)
        take = has & (nth < quota)
        out = torch.where(take, pair_slots[:, j], out)
        left &= ~take
    # left over: a replica on a node the token visits, if any (in turn among them), else its turn
    n_seen = seen.sum(1)
    r = token % n_seen.clamp_min(1)
    nth_seen = (seen.cumsum(1) == (r + 1).unsqueeze(1)) & seen
    pick = torch.where(n_seen > 0, nth_seen.long().argmax(1), turn)
    out = torch.where(left, pair_slots.gather(1, pick.unsqueeze(1)).squeeze(1), out)
    return out.view(t, k)
