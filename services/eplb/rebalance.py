"""Expert placement: which logical expert each physical slot holds, so every GPU carries a
similar load. Vectorized over layers (pure torch, CPU), deterministic.

`rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)` has the signature and
output conventions of DeepSeek's EPLB (github deepseek-ai/EPLB), so code written against it can
call this one: `weight` [layers, experts] is the load per logical expert; it returns `phy2log`
[layers, num_replicas] (the expert each slot holds; GPU g holds slots g·k .. g·k+k-1 with
k = num_replicas / num_gpus, and node n holds GPUs n·m .. n·m+m-1), `log2phy` [layers, experts,
max replicas] (each expert's slots, padded with -1) and `logcnt` [layers, experts].

Policies:
- `hierarchical` (when num_groups % num_nodes == 0; DeepSeek's prefill policy): expert groups
  are packed onto nodes by load, then each node replicates its own experts into its slots and
  packs them onto its GPUs, so a token routed to a few groups touches few nodes;
- `global` (DeepSeek's decode policy): replicate over all slots, then pack onto all GPUs;
- `locality` (`services.eplb.locality`): nodes balanced like the global policy while experts with
  one slot stay on their group's node and replicas go where node loads need them; served by a
  route that picks, per token, replicas on nodes it visits anyway (`services.ep.replica_choice`).

The greedy steps are DeepSeek's (`greedy`), one step for every layer at once.
"""

from __future__ import annotations

import torch

from services.ep.measure import maps
from services.eplb.greedy import hierarchical
from services.eplb.incremental import incremental
from services.eplb.locality import locality


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    policy: str = "auto",
    current: torch.Tensor | None = None,
    tolerance: float = 0.01,
    counts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(phy2log, log2phy, logcnt) for `weight` [layers, experts]; `policy` auto | hierarchical |
    global | locality (auto: hierarchical when groups split evenly over nodes, as DeepSeek's EPLB
    does; locality needs the same, and a route that knows the nodes: `ExpertPlacement.route`).

    With `current` (a phy2log in use), the plan moves as few expert weights as it can while its
    balancedness stays within `tolerance` of a full re-plan's (`incremental`; `counts`: the
    weights are one window's token counts, allow for their noise)."""
    weight = weight.float().cpu()
    experts = weight.shape[1]
    if num_replicas % num_gpus or num_gpus % num_nodes:
        raise ValueError(
            f"{num_replicas} slots over {num_gpus} GPUs on {num_nodes} nodes do not split evenly"
        )
    if policy == "auto":
        policy = "hierarchical" if num_groups % num_nodes == 0 else "global"
    if policy in ("hierarchical", "locality"):
        if experts % num_groups or num_groups % num_nodes:
            raise ValueError(f"{experts} experts in {num_groups} groups do not split over {num_nodes} nodes")
        plan = hierarchical if policy == "hierarchical" else locality
        phy2log = plan(weight, num_replicas, num_groups, num_nodes, num_gpus)
    elif policy == "global":
        phy2log = hierarchical(weight, num_replicas, 1, 1, num_gpus)
    else:
        raise ValueError(f"unknown policy {policy!r}; choose auto, hierarchical, global or locality")
    if current is not None:
        if current.shape != phy2log.shape:
            raise ValueError(f"current placement is {tuple(current.shape)}, expected {tuple(phy2log.shape)}")
        nodes = 1 if policy == "global" else num_nodes
        phy2log = incremental(weight, current.long().cpu(), phy2log, nodes, num_gpus, tolerance, counts)
    return (phy2log, *maps(phy2log, experts))
