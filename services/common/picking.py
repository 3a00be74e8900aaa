"""Least loaded, ties round-robin: the one picking rule of the orchestrator's router and an
instance's DP controller.

Pure Python and dependency-free, so both sides of the import contracts may use it (the
orchestrator never imports engine code; this module has none).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


class LeastLoaded:
    """Picks the candidate with the lowest load; equal loads take turns, so an idle pool spreads work."""

    def __init__(self) -> None:
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def pick(self, candidates: Sequence[T], load: Callable[[T], float]) -> T:
        """The least loaded of `candidates` (not empty) by `load(candidate)`."""
        if not candidates:
            raise ValueError("nothing to pick from")
        loads = [load(c) for c in candidates]
        low = min(loads)
        tied = [c for c, value in zip(candidates, loads, strict=True) if value == low]
        with self._lock:
            turn = next(self._turn)
        return tied[turn % len(tied)]
