"""Counting host synchronisations: the calls that make the host wait for the device's results.

On a GPU every such call stalls the CPU until the stream drains, and one inside a MoE layer rules
out CUDA graphs for the step. `HostSyncCounter` counts them on any device (so the count is
checked on CPU too) by watching, through a torch function mode, the tensor operations that
synchronise on CUDA: reading values to the host (`item`, `tolist`, `cpu`, `numpy`, truth and
number conversions) and the ops whose output size depends on the data (`nonzero`, boolean
masking, `unique`, `bincount`, `repeat_interleave` of tensor repeats without `output_size`, `masked_select`).
Only calls made from the modules named in `scope` are counted, so a library's own (or a test
double's) internals stay out of the figure. Collectives with host-given split sizes are not
counted: the sizes had to reach the host first, which is counted there.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

SYNCING = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.argwhere,
    torch.Tensor.unique,
    torch.unique,
    torch.Tensor.bincount,
    torch.bincount,
    torch.Tensor.masked_select,
    torch.masked_select,
}
OUTPUT_SIZE_OPTIONAL = {torch.Tensor.repeat_interleave, torch.repeat_interleave}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_}


def _bool_index(args: tuple[Any, ...]) -> bool:
    """A boolean tensor among the indices: its True count decides the result's size."""
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple | list) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _function(site: str) -> str:
    """'module.function:line' -> 'function'."""
    return site.split(":")[0].rsplit(".", 1)[1]


def _in_torch(frame: FrameType) -> bool:
    """torch's own Python wrappers, or another counter's handler (counters nest)."""
    name = frame.f_globals.get("__name__", "")
    return name in ("torch", __name__) or name.startswith("torch.")


class HostSyncCounter(TorchFunctionMode):
    """`with HostSyncCounter(("services.",)) as c: ...` then `c.total`, `c.by_site` (module.function:line)."""

    def __init__(self, scope: tuple[str, ...] = ("services.",)):
        super().__init__()
        self.scope = scope
        self.by_site: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_site.values())

    def excluding(self, *functions: str) -> int:
        """The count without the calls made in functions of these names (e.g. the step agreement)."""
        return sum(n for site, n in self.by_site.items() if _function(site) not in functions)

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self._syncs(func, args, kwargs):
            frame = sys._getframe(1)
            while frame.f_back is not None and _in_torch(frame):
                frame = frame.f_back
            module = frame.f_globals.get("__name__", "")
            if module.startswith(self.scope):
                self.by_site[f"{module}.{frame.f_code.co_name}:{frame.f_lineno}"] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _syncs(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if func in SYNCING:
            return True
        if func in OUTPUT_SIZE_OPTIONAL:  # tensor repeats: the output size is their sum
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
        if func is torch.Tensor.to:  # to the host (on CPU a no-op, counted as it would be on CUDA)
            target = args[1] if len(args) > 1 else kwargs.get("device")
            return str(target).startswith("cpu")
        if func in INDEXING:
            return _bool_index(args)
        if func is torch.where:
            return len(args) + len(kwargs) == 1
        return False
