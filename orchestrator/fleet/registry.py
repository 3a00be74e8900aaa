"""Every worker instance the orchestrator knows: where it is, what state it is in, how loaded it is.

An instance is one EP group behind one gRPC address (SGLang's scheduler protocol). Its state:

    starting --healthy--> ready --drain--> draining --empty--> gone
        \\                  \\                  \\
         +------------------+------------------+--> failed (unreachable or unhealthy)

The router pairs only `ready` instances. Load comes from `GetLoads` (per DP rank: running and
waiting requests, KV tokens in use), polled every POLL_S; health from `HealthCheck`, every
HEALTH_EVERY_S in the background for a ready instance (SGLang's runs a generation and may take
20 s). A `ready` instance that refuses connections is `failed` at the next poll, one that answers
with errors within two. A draining
instance takes no new request; it is `gone` once this orchestrator has nothing in flight on it
and the worker reports no request and no KV in use — or, past its deadline, once its remaining
requests were aborted (their clients get a clear error). Membership backends add and remove
instances; the registry never starts or stops processes itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

from orchestrator.fleet.breaker import COOLDOWN_S, THRESHOLD, Breaker
from orchestrator.fleet.instance import Instance, State
from orchestrator.fleet.worker_facts import DpLoad
from services.common.roles import ROLES, Role

__all__ = ["DRAIN_DEADLINE_S", "DpLoad", "Instance", "Registry", "State"]
log = logging.getLogger(__name__)
POLL_S = 0.5
"""How often every instance is health-checked and its load read."""
DRAIN_DEADLINE_S = 300.0
"""Default time a draining instance gets to finish its requests."""


class Registry:
    """The instances of both roles, polled in the background; backends add and remove them."""

    def __init__(self, breaker_threshold: int = THRESHOLD, breaker_cooldown_s: float = COOLDOWN_S) -> None:
        self.breaker_threshold, self.breaker_cooldown_s = breaker_threshold, breaker_cooldown_s
        self.instances: dict[str, Instance] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._drains: dict[str, asyncio.Task[None]] = {}
        self.on_gone: list[Callable[[Instance], None]] = []
        """Called once an instance has drained (or failed), e.g. for a backend to stop it."""

    # -- membership ------------------------------------------------------------------------------

    def add(
        self, role: Role, address: str, bootstrap_port: int | None = None, id: str | None = None
    ) -> Instance:
        inst = Instance(id or f"{role}-{next(self._ids)}", role, address, bootstrap_port)
        inst.breaker = Breaker(self.breaker_threshold, self.breaker_cooldown_s)
        self.instances[inst.id] = inst
        return inst

    def of(self, role: Role, *states: State) -> list[Instance]:
        return [i for i in self.instances.values() if i.role == role and (not states or i.state in states)]

    @property
    def prefill(self) -> list[Instance]:
        return self.of("prefill")

    @property
    def decode(self) -> list[Instance]:
        return self.of("decode")

    @property
    def all(self) -> list[Instance]:
        return list(self.instances.values())

    @property
    def ready(self) -> bool:
        return all(self.of(role, State.READY) for role in ROLES)

    def context_limit(self) -> int:
        """The smallest context of the instances that answered GetModelInfo (0 while none has)."""
        return min((i.context for i in self.all if i.info is not None), default=0)

    async def forget(self, inst: Instance) -> None:
        """Drop a gone or failed instance from the registry (not another one added under its id)."""
        if self.instances.get(inst.id) is inst:
            del self.instances[inst.id]
        await inst.close()

    # -- drain ---------------------------------------------------------------------------------

    def drain(self, inst: Instance, deadline_s: float = DRAIN_DEADLINE_S) -> asyncio.Task[None]:
        """Stop giving `inst` requests and let it finish; the task ends when it is gone."""
        if inst.id not in self._drains:
            inst.drain_deadline = time.monotonic() + deadline_s
            if inst.state in (State.STARTING, State.READY):
                inst.set_state(State.DRAINING, f"drain (deadline {deadline_s:.0f}s)")
            self._drains[inst.id] = asyncio.create_task(self._drain(inst))
        return self._drains[inst.id]

    async def _drain(self, inst: Instance) -> None:
        while inst.state == State.DRAINING:  # a failure meanwhile is reported by the poll instead
            if inst.idle:
                inst.set_state(State.GONE, "drained")
                self._ended(inst)
            elif time.monotonic() > (inst.drain_deadline or 0):
                # Gone first, so the requests' ends can tell the clients why.
                inst.set_state(State.GONE, "drain deadline passed; its requests were aborted")
                for request_id in list(inst.requests):
                    await inst.abort(request_id, reason="instance drained past its deadline")
                self._ended(inst)
            else:
                await asyncio.sleep(min(POLL_S, 0.2))

    def _ended(self, inst: Instance) -> None:
        for callback in self.on_gone:
            callback(inst)

    # -- polling -------------------------------------------------------------------------------

    async def poll_all(self) -> None:
        before = {i.id: i.state for i in self.all}
        await asyncio.gather(*(i.poll() for i in self.all))
        for inst in self.all:
            if inst.state == State.FAILED and before.get(inst.id) != State.FAILED:
                self._ended(inst)

    async def start(self) -> None:
        await self.poll_all()
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            await self.poll_all()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in self._drains.values():
            task.cancel()
        await asyncio.gather(*(i.close() for i in self.all))
