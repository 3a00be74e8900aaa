"""A rank's view of its expert-parallel group: placement, rank, dispatcher, load recorder."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from services.ep.dispatcher import Dispatcher
from services.ep.load import ExpertLoadRecorder
from services.ep.placement import ExpertPlacement

IDLE_POLL_S = 0.02
"""An idle expert-parallel group re-checks for work this often (each check is a collective)."""


@dataclass
class ExpertParallel:
    """Which expert slots this rank holds, how tokens reach them, and how the group agrees to step."""

    placement: ExpertPlacement
    rank: int = 0
    dispatcher: Dispatcher | None = None
    """None for a single-rank group: every slot is local and nothing is exchanged."""
    recorder: ExpertLoadRecorder | None = None
    control: dist.ProcessGroup | None = None
    """A CPU group for the per-step agreement when the dispatcher's group is on GPUs (None: use it)."""
    pending: ExpertPlacement | None = field(default=None, init=False)
    """A placement to switch to, once every rank of the group has it (`switch_now`)."""
    switch_now: bool = field(default=False, init=False)
    """Every rank holds the same pending placement: switch before this step's forward (set by
    `group_has_work`, the same on every rank)."""
    version: int = field(default=0, init=False)
    """Placements switched to so far."""
    group_prefill: bool = field(default=False, init=False)
    """Some rank of the group runs a prefill in this step (set by `group_has_work`, the same on
    every rank)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"), init=False)
    """The model's device: where routing tables and load counts live (`to`)."""

    def __post_init__(self) -> None:
        if self.dispatcher is not None and self.dispatcher.size != self.placement.ep_size:
            raise ValueError(
                f"the dispatcher's group has {self.dispatcher.size} ranks, "
                f"the placement {self.placement.ep_size}"
            )
        if self.dispatcher is None and self.placement.ep_size != 1:
            raise ValueError("a placement over several ranks needs a dispatcher")

    @classmethod
    def single(cls, num_moe_layers: int, num_experts: int, num_slots: int | None = None) -> ExpertParallel:
        placement = ExpertPlacement.default(num_moe_layers, num_experts, num_slots or num_experts, 1)
        return cls(placement, recorder=ExpertLoadRecorder(num_moe_layers, num_experts))

    def to(self, device: torch.device | str) -> None:
        """Route and count on `device` (the model's) from now on; a pending placement follows when
        it is switched to (`take_pending`)."""
        self.device = torch.device(device)
        self.placement = self.placement.to(self.device)
        if self.recorder is not None:
            self.recorder.to(self.device)

    def prepare(self, hidden: int, topk: int) -> None:
        """Start-up, on the rank's device and thread: the dispatcher's communication buffers."""
        if self.dispatcher is not None:
            self.dispatcher.setup(hidden, topk)

    def take_pending(self) -> None:
        """Switch to the pending placement (every rank at the same step)."""
        assert self.pending is not None
        self.placement, self.pending, self.switch_now = self.pending.to(self.device), None, False
        self.version += 1

    @property
    def expanded(self) -> bool:
        """This step's MoE layers use the dispatcher's expanded layout (decode-only steps)."""
        return self.dispatcher is not None and self.dispatcher.expanded and not self.group_prefill

    @property
    def size(self) -> int:
        return self.placement.ep_size

    @property
    def lockstep(self) -> bool:
        """Several ranks: every rank must run every MoE layer in every step, work or not."""
        return self.dispatcher is not None

    @property
    def idle_poll_s(self) -> float | None:
        """How long an idle rank may wait before the next step: None alone, a short tick in a group."""
        return IDLE_POLL_S if self.lockstep else None

    def group_has_work(self, has_work: bool, stop: bool = False, prefill: bool = False) -> tuple[bool, bool]:
        """(does any rank have work, did any rank ask to stop): one collective in a group.

        Every rank calls it once per step, so all ranks run the same forwards and leave together.
        `prefill`: this rank's step is a prefill (sets `group_prefill`, and so `expanded`).
        """
        pending = self.pending is not None
        if self.dispatcher is None:
            self.switch_now = pending
            return has_work, stop
        asked = [has_work, stop, prefill, pending, not pending]
        if self.control is not None:
            flags = torch.tensor([int(f) for f in asked])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control)
            work, stopping, any_prefill, some_pending, some_lacking = (bool(f) for f in flags)
        else:
            work, stopping, any_prefill, some_pending, some_lacking = self.dispatcher.agree(asked)
        self.switch_now = some_pending and not some_lacking
        self.group_prefill = any_prefill
        return work, stopping

    @property
    def first_local_slot(self) -> int:
        return self.rank * self.placement.slots_per_rank
