"""Where instances come from: one backend per module, chosen by `--membership`.

- `static`: fixed addresses from flags (`host:port`, or `grpc://host:port` with an optional
  bootstrap port for SGLang prefill workers). It cannot scale.
- `local`: spawns and stops instance process groups on this machine and keeps the desired count.
- `kubernetes`: LeaderWorkerSet groups found by pod labels and watched; scales the sets.

A backend adds instances to the registry, scales a role by whole instances (scale-down always
drains first) and is told when an instance is gone or failed.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any

from orchestrator.fleet.registry import Registry
from services.common.roles import Role

BACKENDS = {
    "static": "orchestrator.fleet.membership.static",
    "local": "orchestrator.fleet.membership.local",
    "kubernetes": "orchestrator.fleet.membership.kubernetes",
}


class ScaleError(ValueError):
    """A scale request this backend cannot carry out; the message says why."""


class Membership(ABC):
    """One way of finding and changing the instances of both pools."""

    name: str

    def __init__(self, registry: Registry):
        self.registry = registry

    @abstractmethod
    async def start(self) -> None:
        """Register the instances that exist (or start the desired ones)."""

    async def stop(self) -> None:  # noqa: B027 (optional: only backends that start processes stop them)
        """Stop what this backend started (nothing for backends that start nothing)."""

    def problem(self) -> str | None:
        """Why this backend cannot currently see the instances as they are (`/ready` says it), or None."""
        return None

    def desired(self) -> dict[Role, int]:
        """The instance count each role should have."""
        return {role: len(self.registry.of(role)) for role in ("prefill", "decode")}

    def check_scale(self, role: Role, count: int) -> None:
        """Raise ScaleError if this backend cannot bring `role` to `count` instances."""
        raise ScaleError(f"the {self.name} membership backend cannot scale; use --membership local")

    async def scale(self, role: Role, count: int) -> None:
        """Bring `role` to `count` instances: new ones start, surplus ones drain and then stop."""
        self.check_scale(role, count)


def create(name: str, registry: Registry, **options: Any) -> Membership:
    if name not in BACKENDS:
        raise ValueError(f"unknown membership backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    module = importlib.import_module(BACKENDS[name])
    backend: type[Membership] = module.Backend  # each backend module's Backend is a Membership
    return backend(registry, **options)
