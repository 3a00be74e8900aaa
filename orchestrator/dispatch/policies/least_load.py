"""`least_load`: the ready prefill instance with the fewest requests in flight (ties take turns)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from orchestrator.fleet.instance import Instance
from services.common.picking import LeastLoaded


@dataclass
class LeastLoad:
    """No parameters; the instance's DP controller places the request on one of its ranks."""

    _picker: LeastLoaded = field(default_factory=LeastLoaded, init=False, repr=False)

    def pick(self, ready: Sequence[Instance], prompt_ids: Sequence[int]) -> tuple[Instance, int | None]:
        return self._picker.pick(ready, load=lambda i: i.inflight), None
