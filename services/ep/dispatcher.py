"""Moving tokens to the ranks that hold their experts, and their outputs back.

The contract is DeepEP's normal mode: a token travels once to each rank that holds any of its
chosen slots, with its slot list translated to that rank's local slot indices (-1 where a choice
lives elsewhere) and its routing weights; `combine` sums the rows that came back per token.

A backend may also offer DeepEP's expanded layout (`dispatch_expanded`): one row per (token,
local slot) grouped by slot, with the group boundaries left on the device, so the expert GEMMs
run without the host learning how many rows arrived (no host sync, as decode needs).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import torch.distributed as dist


@dataclass
class Dispatched:
    """What a rank received from `dispatch`."""

    x: torch.Tensor
    """[N, D] tokens received by this rank."""
    local_slots: torch.Tensor
    """[N, K] local slot index per choice, -1 where the choice lives on another rank."""
    weights: torch.Tensor
    """[N, K] routing weights (fp32)."""
    handle: Any
    """What `combine` needs to send results back."""


@dataclass
class Expanded:
    """What a rank received from `dispatch_expanded`: rows grouped by local slot, sizes on the device."""

    x: torch.Tensor
    """[R, D] one row per (token, local slot); R is a worst case fixed by the group's shape, and
    rows at or past `offsets[-1]` are padding with unspecified contents."""
    offsets: torch.Tensor
    """[S] int32 on x's device: slot s owns rows [offsets[s-1], offsets[s]) (offsets[-1] = 0)."""
    weights: torch.Tensor
    """[R] fp32 routing weight of each row."""
    handle: Any
    """What `combine_expanded` needs to send results back."""


class Dispatcher(ABC):
    """One EP group's token exchange; every rank calls dispatch and combine, in the same order."""

    rank: int
    size: int
    group: dist.ProcessGroup | None
    expanded: bool = False
    """Offers `dispatch_expanded` / `combine_expanded` (used for decode steps)."""

    def setup(self, hidden: int, topk: int) -> None:  # noqa: B027 (most backends need no buffers)
        """Allocate communication buffers for rows of `hidden` and `topk` choices: at start-up, in
        the thread and on the device that will use them, never lazily inside the first forward."""

    @abstractmethod
    def dispatch(
        self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slots_per_rank: int
    ) -> Dispatched:
        """x [T, D], slots [T, K] physical slot ids, weights [T, K] -> what this rank must compute."""

    @abstractmethod
    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        """y [N, D] (this rank's weighted partial outputs) -> [T, D] summed per original token."""

    @abstractmethod
    def agree(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag ORed over the ranks (a collective: every rank calls it with as many flags)."""

    def dispatch_expanded(
        self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slots_per_rank: int
    ) -> Expanded:
        """Like `dispatch`, into the expanded per-slot layout (only where `expanded` is True)."""
        raise NotImplementedError(f"{type(self).__name__} has no expanded layout")

    def combine_expanded(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        """y [R, D] weighted expert outputs per expanded row -> [T, D] summed per original token."""
        raise NotImplementedError(f"{type(self).__name__} has no expanded layout")

    def validate(self, hidden: int, dtype: str, num_slots: int) -> None:  # noqa: B027 (optional hook)
        """Raise ValueError naming the limit if this backend cannot move such rows (checked at start-up)."""

    def any(self, flag: bool) -> bool:
        """True if `flag` is set on any rank (a collective: every rank must call it)."""
        return self.agree([flag])[0]


BACKENDS: dict[str, Callable[..., Dispatcher]] = {}
"""Registered backends by name (filled when a backend's module is imported)."""
MODULES = {"torch": "services.ep.torch_a2a", "deepep": "services.ep.deepep"}
"""Where each backend lives; imported only when chosen (DeepEP needs CUDA)."""


def register(name: str) -> Callable[[Callable[..., Dispatcher]], Callable[..., Dispatcher]]:
    """Class decorator: make a backend available to `create` under `name`."""

    def deco(factory: Callable[..., Dispatcher]) -> Callable[..., Dispatcher]:
        BACKENDS[name] = factory
        return factory

    return deco


def create(name: str, **kwargs: Any) -> Dispatcher:
    """The backend `name` for the default process group (its module is imported now)."""
    if name not in MODULES:
        raise ValueError(f"unknown dispatcher backend {name!r}; available: {', '.join(sorted(MODULES))}")
    importlib.import_module(MODULES[name])
    return BACKENDS[name](**kwargs)
