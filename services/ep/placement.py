"""Where routed experts live: physical slots (>= logical experts) spread over the EP ranks.

Every MoE layer has its own physical->logical map. Rank r holds slots
[r * slots_per_rank, (r + 1) * slots_per_rank), and node n ranks [n * ep_size / num_nodes, ...).
A logical expert may have several replicas (hot experts get redundant slots); each token picks
one, spreading the load. Where an expert has replicas on several nodes, tokens pick those on nodes
they visit anyway (`replica_choice`), so fewer tokens cross nodes.

The tables are built on the CPU at start-up (and for a new placement, when it is planned); `to`
gives the placement whose routing tables live on the model's device, so `route` runs where the
router's ids are, without reading anything back to the host.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from services.ep import replica_choice
from services.ep.measure import balancedness


class PlacementError(ValueError):
    """A placement that cannot be served (slot counts, divisibility, a missing expert)."""


@dataclass(frozen=True)
class ExpertPlacement:
    """Which logical expert each physical slot holds, per layer, and how tokens pick a replica."""

    num_experts: int
    ep_size: int
    phys_to_log: torch.Tensor
    """[layers, slots] logical expert held by each physical slot."""
    log_to_phys: torch.Tensor = field(init=False)
    """[layers, experts, max_replicas] slots holding each expert, padded with -1."""
    replicas: torch.Tensor = field(init=False)
    """[layers, experts] number of replicas of each expert."""
    num_nodes: int = 1
    """Nodes the ranks span (evenly, in rank order)."""
    if TYPE_CHECKING:  # set in __post_init__; not dataclass fields at run time
        _identity: list[bool] = field(init=False, repr=False, compare=False)
        _slot_node: torch.Tensor = field(init=False, repr=False, compare=False)
        _spread: list[bool] = field(init=False, repr=False, compare=False)
        _route: RouteTables = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        layers, slots = self.phys_to_log.shape
        if slots < self.num_experts:
            raise PlacementError(f"{slots} physical slots cannot hold {self.num_experts} experts")
        if slots % self.ep_size:
            raise PlacementError(f"{slots} slots do not split evenly over {self.ep_size} EP ranks")
        if self.num_nodes < 1 or self.ep_size % self.num_nodes:
            raise PlacementError(f"{self.ep_size} EP ranks do not split evenly over {self.num_nodes} nodes")
        replicas = torch.stack(
            [torch.bincount(self.phys_to_log[i], minlength=self.num_experts) for i in range(layers)]
        )  # [L, E]
        if (replicas == 0).any():
            layer, expert = (replicas == 0).nonzero()[0].tolist()
            raise PlacementError(f"layer {layer}: expert {expert} has no slot")
        width = int(replicas.max())
        table = torch.full((layers, self.num_experts, width), -1, dtype=torch.long)
        for i in range(layers):
            order = torch.argsort(self.phys_to_log[i], stable=True)  # slots grouped by expert
            rank_in_expert = (
                torch.arange(slots) - (torch.cumsum(replicas[i], 0) - replicas[i])[self.phys_to_log[i][order]]
            )
            table[i, self.phys_to_log[i][order], rank_in_expert] = order
        object.__setattr__(self, "log_to_phys", table)
        object.__setattr__(self, "replicas", replicas)
        identity = torch.arange(slots) == self.phys_to_log  # [L, S]
        object.__setattr__(
            self, "_identity", [slots == self.num_experts and bool(row.all()) for row in identity]
        )
        slot_node = torch.arange(slots) // (slots // self.num_nodes)
        object.__setattr__(self, "_slot_node", slot_node)
        # layers where some expert has replicas on two nodes: routed with locality in mind
        spread = [self.num_nodes > 1 and _spans_nodes(table[i], slot_node) for i in range(layers)]
        object.__setattr__(self, "_spread", spread)
        object.__setattr__(self, "_route", RouteTables(table, replicas, slot_node))

    def to(self, device: torch.device | str) -> ExpertPlacement:
        """This placement with its routing tables on `device` (the CPU tables stay as they are)."""
        placed = copy.copy(self)
        route = self._route
        tables = RouteTables(
            route.log_to_phys.to(device), route.replicas.to(device), route.slot_node.to(device)
        )
        object.__setattr__(placed, "_route", tables)
        return placed

    @property
    def device(self) -> torch.device:
        """Where `route` runs."""
        return self._route.replicas.device

    @classmethod
    def default(
        cls, num_layers: int, num_experts: int, num_slots: int, ep_size: int, num_nodes: int = 1
    ) -> ExpertPlacement:
        """Slot s holds expert s; the redundant slots beyond the experts replicate experts 0, 1, ..."""
        if num_slots < num_experts:
            raise PlacementError(f"--ep-slots {num_slots} is below the model's {num_experts} routed experts")
        row = torch.arange(num_slots) % num_experts
        return cls(num_experts, ep_size, row.repeat(num_layers, 1), num_nodes)

    def balancedness(self, counts: torch.Tensor) -> float | None:
        """Mean ÷ max tokens per rank, averaged over layers that had traffic (None: none had).

        `counts` [layers, experts] are tokens per logical expert; an expert's tokens split evenly
        over its replicas, as `route` spreads them. 1.0 is perfect balance.
        """
        busy = counts.sum(1) > 0
        if not bool(busy.any()):
            return None
        return balancedness(counts[busy], self.phys_to_log[busy], self.ep_size)

    @property
    def num_slots(self) -> int:
        return self.phys_to_log.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.ep_size

    def local_slots(self, rank: int) -> range:
        return range(rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank)

    def route(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Logical expert ids [T, K] -> physical slots [T, K], spreading tokens over replicas.

        `ids` must be on the placement's `device`; nothing is read back to the host."""
        if self._identity[layer]:
            return ids  # slot e holds expert e, no replicas
        tables = self._route
        log_to_phys, replicas = tables.log_to_phys[layer], tables.replicas[layer]
        if self._spread[layer]:
            return replica_choice.route(ids, log_to_phys, replicas, tables.slot_node, self.num_nodes)
        t, k = ids.shape
        count = replicas[ids]  # [T, K]
        rows = torch.arange(t, device=ids.device)[:, None] + torch.arange(k, device=ids.device)[None, :]
        return log_to_phys[ids, rows % count]  # [T, K]: the replicas in turn


@dataclass(frozen=True)
class RouteTables:
    """What `route` reads each step, on the device it runs on."""

    log_to_phys: torch.Tensor
    """[layers, experts, max_replicas] slots holding each expert, padded with -1."""
    replicas: torch.Tensor
    """[layers, experts] number of replicas of each expert."""
    slot_node: torch.Tensor
    """[slots] the node each slot is on."""


def _spans_nodes(table: torch.Tensor, slot_node: torch.Tensor) -> bool:
    """Whether some expert of one layer's log_to_phys [experts, replicas] sits on two nodes."""
    nodes = torch.where(table >= 0, slot_node[table.clamp_min(0)], -1)
    return bool(((nodes != nodes[:, :1]) & (table >= 0)).any())
