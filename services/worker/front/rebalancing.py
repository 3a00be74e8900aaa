"""Switching an instance to a new expert placement while it serves, on request or on a timer.

Rank 0 decides the placement (given, or planned from the load window with `services.eplb`'s
incremental mode, so few slots move), hands it to every rank (`SetPlacement`: pending on each),
and waits until all have switched: the ranks take it at the same step, agreed in the group's
per-step collective, moving only the changed slots' weights (`services.ep.slot_moves`).
`--eplb-interval S` re-plans from the window every S seconds and switches when the plan changes
a slot.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from services.common.calls import CallError
from services.engine import Engine
from services.ep import ExpertParallel, ExpertPlacement, PlacementError
from services.eplb import balancedness, rebalance_experts
from services.worker import messages as msg
from services.worker.front.dp_controller import DPController

log = logging.getLogger(__name__)
TIMEOUT_S = 10.0
SWITCH_TIMEOUT_S = 60.0
"""How long a switch may take on every rank (one step of the group, plus the weight copy)."""
NOT_A_GROUP = "rebalancing moves experts between EP ranks: start the instance with --ep 2 or more"
UNDER_WAY = "a placement switch is already under way; retry once it is done"


def summed(loads: list[msg.ExpertLoad]) -> torch.Tensor:
    """[moe layers, experts] tokens per logical expert, summed over the ranks' windows."""
    return torch.tensor([ld.counts for ld in loads], dtype=torch.long).sum(0)


class RebalanceError(Exception):
    """A switch that cannot happen: a canonical status name and what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Switched:
    version: int
    slots_changed: int
    before: float
    """Balancedness of the load window under the old placement (0 without a window) and the new."""
    after: float


class Rebalancer:
    def __init__(self, engine: Engine, controller: DPController):
        self.engine, self.ctl = engine, controller
        self._lock = threading.Lock()

    @property
    def parallel(self) -> ExpertParallel:
        return self.engine.model.parallel

    def window(self) -> tuple[torch.Tensor, list[msg.ExpertLoad]]:
        """(tokens per logical expert per MoE layer, summed over the ranks' windows, as floats;
        each rank's answer)."""
        try:
            loads = self.ctl.ask_all("expert_load", TIMEOUT_S)
        except CallError as e:
            raise RebalanceError("UNAVAILABLE", f"EP instance rank unreachable: {e.message}") from None
        return summed(loads).float(), loads

    def planned(self, weight: torch.Tensor, tolerance: float) -> torch.Tensor:
        """A placement near the current one for `weight` (within `tolerance` of a full re-plan)."""
        par = self.parallel
        current, nodes = par.placement.phys_to_log, par.placement.num_nodes
        # over several nodes: the locality policy, the model's expert groups (or one per node) kept
        # on nodes; on one node: the global policy
        groups = self.engine.model_config.n_group
        groups = groups if groups % nodes == 0 and weight.shape[1] % groups == 0 else nodes
        policy = "locality" if nodes > 1 and weight.shape[1] % groups == 0 else "global"
        shape = (current.shape[1], groups, nodes, par.size)
        return rebalance_experts(weight, *shape, policy, current, tolerance, counts=True)[0]

    def checked(self, flat: list[int]) -> torch.Tensor:
        """`flat` ([layers x slots], row-major) as a placement this instance can serve."""
        par = self.parallel
        current = par.placement.phys_to_log
        if len(flat) != current.numel():
            shape = "x".join(map(str, current.shape))
            raise RebalanceError(
                "INVALID_ARGUMENT", f"phy2log has {len(flat)} entries; this instance has {shape}"
            )
        new = torch.tensor(flat, dtype=torch.long).view(current.shape)
        try:
            ExpertPlacement(par.placement.num_experts, par.size, new, par.placement.num_nodes)
        except (PlacementError, RuntimeError, IndexError) as e:
            raise RebalanceError("INVALID_ARGUMENT", f"the placement cannot be served: {e}") from None
        return new

    def switch(self, new: torch.Tensor, weight: torch.Tensor) -> Switched:
        """Hand `new` to every rank and return once all of them have switched to it."""
        par = self.parallel
        if par.dispatcher is None:
            raise RebalanceError("FAILED_PRECONDITION", NOT_A_GROUP)
        with self._lock:
            if par.pending is not None:
                raise RebalanceError("FAILED_PRECONDITION", UNDER_WAY)
            current, before = par.placement.phys_to_log, par.version
            try:
                self._hand_over(tuple(map(tuple, new.tolist())), before)
            except CallError as e:
                raise RebalanceError("UNAVAILABLE", f"EP instance rank unreachable: {e.message}") from None
        seen = float(weight.sum()) > 0
        return Switched(
            par.version,
            int((new != current).sum()),
            balancedness(weight, current, par.size) if seen else 0.0,
            balancedness(weight, new, par.size) if seen else 0.0,
        )

    def _hand_over(self, rows: tuple[tuple[int, ...], ...], before: int) -> None:
        calls = [self.ctl.call(r, lambda cid: msg.SetPlacement(cid, rows)) for r in range(self.ctl.size)]
        if not all(call.result(TIMEOUT_S) for call in calls):
            raise RebalanceError("FAILED_PRECONDITION", UNDER_WAY)
        deadline = time.monotonic() + SWITCH_TIMEOUT_S
        while min(self.ctl.ask_all("placement", TIMEOUT_S)) <= before:
            if time.monotonic() > deadline:
                raise RebalanceError(
                    "DEADLINE_EXCEEDED", f"the ranks did not switch in {SWITCH_TIMEOUT_S:.0f}s"
                )
            time.sleep(0.02)

    def every(self, interval_s: float, tolerance: float) -> threading.Thread:
        """Re-plan from the window every `interval_s` and switch when the plan changes a slot."""

        def run() -> None:
            while True:
                time.sleep(interval_s)
                try:
                    weight, _ = self.window()
                    if not float(weight.sum()):
                        continue
                    new = self.planned(weight, tolerance)
                    if torch.equal(new, self.parallel.placement.phys_to_log):
                        continue
                    done = self.switch(new, weight)
                    log.info(
                        "expert placement %d: %d slots changed, balancedness %.4f -> %.4f",
                        done.version, done.slots_changed, done.before, done.after,
                    )  # fmt: skip
                except RebalanceError as e:
                    log.warning("periodic rebalance skipped: %s", e)

        thread = threading.Thread(target=run, name="eplb", daemon=True)
        thread.start()
        return thread
