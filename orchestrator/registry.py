"""Every worker instance the orchestrator knows: where it is, what state it is in, how loaded it is.

An instance is one EP group behind one gRPC address (SGLang's scheduler protocol). Its state:

    starting --healthy--> ready --drain--> draining --empty--> gone
        \\                  \\                  \\
         +------------------+------------------+--> failed (unreachable or unhealthy)

The router pairs only `ready` instances. Health comes from `HealthCheck` and load from
`GetLoads` (per DP rank: running and waiting requests, KV tokens in use), polled every
POLL_S; a `ready` instance that stops answering is `failed` within about two polls. A draining
instance takes no new request; it is `gone` once this orchestrator has nothing in flight on it
and the worker reports no request and no KV in use — or, past its deadline, once its remaining
requests were aborted (their clients get a clear error). Membership backends add and remove
instances; the registry never starts or stops processes itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

from orchestrator.breaker import COOLDOWN_S, THRESHOLD, Breaker
from services.proto.moeserve.v1 import worker_control_pb2 as ctl
from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc

log = logging.getLogger(__name__)
Role = Literal["prefill", "decode"]
ROLES: tuple[Role, ...] = ("prefill", "decode")
POLL_S = 0.5
"""How often every instance is health-checked and its load read."""
RPC_TIMEOUT_S = 2.0
DRAIN_DEADLINE_S = 300.0
"""Default time a draining instance gets to finish its requests."""


class State(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    GONE = "gone"
    FAILED = "failed"


@dataclass(frozen=True)
class RankLoad:
    """One DP rank's load as its worker reports it."""

    dp_rank: int
    running: int
    waiting: int
    kv_used_tokens: int
    kv_total_tokens: int


@dataclass(eq=False)
class Instance:
    """One instance as the orchestrator sees it."""

    id: str
    role: Role
    address: str
    """host:port of the instance's gRPC server."""
    bootstrap_port: int | None = None
    """A prefill instance's KV bootstrap port when it differs from its gRPC port (SGLang's does)."""
    state: State = State.STARTING
    inflight: int = 0
    """Requests this orchestrator has in flight on the instance (the least-load signal)."""
    requests: set[str] = field(default_factory=set)
    """Their ids (aborted if a drain runs past its deadline)."""
    served: int = 0
    """Requests this orchestrator has sent it so far."""
    pid: int | None = None
    """The instance's process on this machine (local backend), else None."""
    breaker: Breaker = field(default_factory=Breaker)
    """Stops its traffic after consecutive failed requests; a probe lets it back."""
    balancedness: float | None = None
    """Expert load over its EP ranks, mean / max per MoE layer averaged (1.0 = even); None unknown."""
    loads: list[RankLoad] = field(default_factory=list)
    ep_size: int = 0
    """Ranks of the instance's EP group, from GetServerInfo (0 until known)."""
    info: pb.GetModelInfoResponse | None = None
    reason: str = ""
    """Why the instance is failed or gone."""
    since: float = field(default_factory=time.monotonic)
    drain_deadline: float | None = None
    _failures: int = 0
    _channel: grpc.aio.Channel | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def bootstrap(self) -> tuple[str, int]:
        """Where a decode instance fetches this prefill instance's KV (host, port)."""
        return self.host, self.bootstrap_port or self.port

    @property
    def healthy(self) -> bool:
        return self.state == State.READY

    @property
    def stub(self) -> pb_grpc.SglangSchedulerStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        return pb_grpc.SglangSchedulerStub(self._channel)

    def set_state(self, state: State, reason: str = "") -> None:
        if state != self.state:
            log.info(
                "instance %s (%s %s): %s -> %s %s",
                self.id,
                self.role,
                self.address,
                self.state.value,
                state.value,
                reason,
            )
            self.state, self.since, self.reason = state, time.monotonic(), reason or self.reason

    @property
    def idle(self) -> bool:
        """Nothing of ours in flight and, as last reported, no request and no KV on the worker."""
        return self.inflight == 0 and all(
            ld.running == 0 and ld.waiting == 0 and ld.kv_used_tokens == 0 for ld in self.loads
        )

    async def poll(self) -> None:
        """One health check and load read; moves starting/ready/failed as the answers say."""
        if self.state == State.GONE:
            return
        try:
            health = await self.stub.HealthCheck(pb.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
            if health.healthy:
                loads = await self.stub.GetLoads(pb.GetLoadsRequest(), timeout=RPC_TIMEOUT_S)
                self.loads = [
                    RankLoad(
                        ld.dp_rank,
                        ld.num_running_reqs,
                        ld.num_waiting_reqs,
                        ld.num_used_tokens,
                        ld.max_total_num_tokens,
                    )
                    for ld in loads.loads
                ]
                self.balancedness = await self._balancedness()
                if self.info is None:
                    self.info = await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S)
                    server = await self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=RPC_TIMEOUT_S)
                    self.ep_size = _ep_size(server) or len(self.loads)
        except grpc.aio.AioRpcError as e:
            self._unhealthy(
                f"{e.code().name}: {e.details()}", refused=e.code() == grpc.StatusCode.UNAVAILABLE
            )
            return
        if not health.healthy:
            self._unhealthy("HealthCheck says unhealthy", refused=False)
            return
        self._failures = 0
        if self.state in (State.STARTING, State.FAILED):  # a failed instance that answers again is back
            self.set_state(State.READY, "healthy")

    async def _balancedness(self) -> float | None:
        """From moeserve's WorkerControl.GetExpertLoad (other workers lack it: None). Experts are
        taken as split evenly and in order over the ranks (the default placement)."""
        try:
            res = await ctl_grpc.WorkerControlStub(self._channel).GetExpertLoad(
                ctl.GetExpertLoadRequest(), timeout=RPC_TIMEOUT_S
            )
        except grpc.aio.AioRpcError:
            return None
        ranks = max(1, res.ep_size)
        ratios = []
        for layer in res.layers:
            per_rank = len(layer.tokens_per_expert) // ranks
            loads = [sum(layer.tokens_per_expert[r * per_rank : (r + 1) * per_rank]) for r in range(ranks)]
            if per_rank and max(loads):
                ratios.append(sum(loads) / ranks / max(loads))
        return sum(ratios) / len(ratios) if ratios else None

    def _unhealthy(self, why: str, refused: bool) -> None:
        if self.state in (State.STARTING, State.FAILED):
            return  # still coming up, or still down
        self._failures += 1
        if refused or self._failures >= 2:
            self.set_state(State.FAILED, why)

    async def abort(self, request_id: str, reason: str = "client") -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.stub.Abort(pb.AbortRequest(request_id=request_id, reason=reason), timeout=5.0)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def describe(self) -> dict[str, Any]:
        """The instance as the admin API shows it."""
        return {
            "id": self.id,
            "role": self.role,
            "address": self.address,
            "bootstrap": ":".join(map(str, self.bootstrap)) if self.role == "prefill" else None,
            "state": self.state.value,
            "reason": self.reason,
            "ep_size": self.ep_size,
            "inflight": self.inflight,
            "served": self.served,
            "pid": self.pid,
            "running": sum(ld.running for ld in self.loads),
            "waiting": sum(ld.waiting for ld in self.loads),
            "kv_used_tokens": sum(ld.kv_used_tokens for ld in self.loads),
            "kv_total_tokens": sum(ld.kv_total_tokens for ld in self.loads),
            "balancedness": self.balancedness,
            "breaker": self.breaker.state.value,
            "breaker_opened": self.breaker.opened,
            "dp_ranks": [ld.__dict__ for ld in self.loads],
        }


def _ep_size(server: pb.GetServerInfoResponse) -> int:
    args = dict(server.server_args.items()) if server.HasField("server_args") else {}
    for key in ("ep_size", "dp_size"):
        value = args.get(key)
        if value is not None and str(value).isdigit():
            return int(value)
    return 0


class Registry:
    """The instances of both roles, polled in the background; backends add and remove them."""

    def __init__(self, breaker_threshold: int = THRESHOLD, breaker_cooldown_s: float = COOLDOWN_S) -> None:
        self.breaker_threshold, self.breaker_cooldown_s = breaker_threshold, breaker_cooldown_s
        self.instances: dict[str, Instance] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task | None = None
        self._drains: dict[str, asyncio.Task] = {}
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
        return min((i.info.max_context_length for i in self.all if i.info is not None), default=0)

    async def forget(self, inst: Instance) -> None:
        """Drop a gone or failed instance from the registry."""
        self.instances.pop(inst.id, None)
        await inst.close()

    # -- drain ---------------------------------------------------------------------------------

    def drain(self, inst: Instance, deadline_s: float = DRAIN_DEADLINE_S) -> asyncio.Task:
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
