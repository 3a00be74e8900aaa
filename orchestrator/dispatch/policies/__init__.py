"""How the router picks a prefill instance (and its DP rank): plugins registered by name.

Each policy is one module with a dataclass whose fields are its documented parameters
(`moeserve serve --prefill-policy NAME --policy-option KEY=VALUE ...`). Decode instances are
always the least loaded (the prompt's KV comes to them, so where it was computed is what matters).

- `least_load`: the ready instance with the fewest requests in flight from this orchestrator.
- `prefix_affinity` (default): the instance, and DP rank, that most recently served the longest
  page-aligned prefix of the prompt, unless that instance is too loaded (`prefix_affinity.py`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Protocol

from orchestrator.dispatch.policies.least_load import LeastLoad
from orchestrator.dispatch.policies.prefix_affinity import PrefixAffinity
from orchestrator.fleet.instance import Instance


class PrefillPolicy(Protocol):
    def pick(self, ready: Sequence[Instance], prompt_ids: Sequence[int]) -> tuple[Instance, int | None]:
        """One of `ready` (not empty) for the prompt, and the DP rank to pin (None: the instance's own)."""
        ...


POLICIES: dict[str, type] = {"least_load": LeastLoad, "prefix_affinity": PrefixAffinity}
DEFAULT = "prefix_affinity"


def create(name: str, options: dict[str, str] | None = None) -> PrefillPolicy:
    """The policy `name` with `options` (strings, converted to the parameters' types)."""
    if name not in POLICIES:
        raise ValueError(f"unknown prefill policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    hints = typing.get_type_hints(cls)
    params = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, raw in (options or {}).items():
        if key not in params:
            known = ", ".join(sorted(params)) or "none"
            raise ValueError(f"prefill policy {name} has no option {key!r} (it takes: {known})")
        try:
            kwargs[key] = params[key](raw)  # int, float or str parameters
        except ValueError:
            raise ValueError(
                f"prefill policy option {key}={raw!r}: expected {params[key].__name__}"
            ) from None
    return typing.cast(PrefillPolicy, cls(**kwargs))  # POLICIES' classes are PrefillPolicy dataclasses
