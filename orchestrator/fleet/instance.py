"""One instance as the orchestrator sees it: its address, state, load per DP rank and breaker.

Its gRPC calls live here: health and load polling (`poll`), expert-load balancedness, Abort;
what the answers mean is read by `worker_facts.py`. The registry (`registry.py`) holds the
instances and moves them through drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

from orchestrator.fleet import grpc_auth
from orchestrator.fleet import worker_facts as facts
from orchestrator.fleet.breaker import Breaker
from orchestrator.fleet.first_token_stream import FirstTokenFeed
from orchestrator.fleet.worker_facts import DpLoad
from services.common import wire
from services.common.roles import Role
from services.proto.moeserve.v1 import worker_control_pb2 as ctl
from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc

log = logging.getLogger(__name__)
RPC_TIMEOUT_S = 2.0
HEALTH_TIMEOUT_S = 25.0
"""SGLang's HealthCheck runs a real one-token generation and gives it 20 s
(`SGLANG_HEALTH_CHECK_TIMEOUT`): a healthy worker under load may take that long to answer."""
HEALTH_EVERY_S = 5.0
"""A ready instance's health is checked this often (each check costs an SGLang worker a
generation); its load is read every poll, and a refused connection fails it at once."""
KV_EVENT_COUNTS = ("batches", "blocks_stored", "blocks_removed")


class State(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    GONE = "gone"
    FAILED = "failed"


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
    loads: list[DpLoad] = field(default_factory=list)
    ep_size: int = 0
    """Ranks of the instance's EP group, from GetServerInfo (0 until known)."""
    slots: int = 0
    """Requests it runs at once, all DP ranks together (`worker_facts.slots`; 0 until known)."""
    decode_first: bool = False
    """It serves decode-first dispatch (`services.common.wire`; GetServerInfo says so)."""
    info: pb.GetModelInfoResponse | None = None
    reason: str = ""
    """Why the instance is failed or gone."""
    since: float = field(default_factory=time.monotonic)
    drain_deadline: float | None = None
    _failures: int = 0
    _channel: grpc.aio.Channel | None = field(default=None, repr=False)
    _stub: pb_grpc.SglangSchedulerStub | None = field(default=None, repr=False)
    _first_tokens: FirstTokenFeed | None = field(default=None, repr=False)
    _health: asyncio.Future[tuple[str, bool]] | None = field(default=None, repr=False)
    """The HealthCheck in flight: its result is ("", _) when healthy, else (why not, refused)."""
    _health_at: float = 0.0
    health: dict[str, float] = field(default_factory=lambda: {"checks": 0, "failures": 0, "last_s": 0.0})
    """HealthCheck answers, the failed ones, and how long the last took (the admin API shows them)."""
    kv_events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KV_EVENT_COUNTS, 0))
    """KV-event batches followed, and the index blocks they stored and removed (`kv_event_feed`)."""

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
        """The instance's stub, made once per channel (a stub builds a callable per RPC)."""
        self._connect()
        return self._stub

    def _connect(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc_auth.channel(self.address)
            self._stub = pb_grpc.SglangSchedulerStub(self._channel)
        return self._channel

    @property
    def first_tokens(self) -> FirstTokenFeed:
        """Prefill (decode-first): its FirstTokens stream to this router (`first_tokens.py`)."""
        if self._first_tokens is None:
            self._first_tokens = FirstTokenFeed(self._connect)
        return self._first_tokens

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

    @property
    def context(self) -> int:
        """The longest sequence it takes (0 until known; `worker_facts.context`)."""
        return 0 if self.info is None else facts.context(self.info)

    async def poll(self) -> None:
        """One load read, and a health check when one is due (in the background: SGLang's takes up
        to 20 s, and one slow instance must not hold the others' polls); moves starting/ready/failed
        as the answers say."""
        if self.state == State.GONE:
            return
        verdict = self._health_verdict()
        if verdict is None and self._health is None and self._health_due():
            self._health = asyncio.ensure_future(self._check_health())
            if self.state != State.READY:  # nothing to hold up: wait as long as for any call
                await asyncio.wait({self._health}, timeout=RPC_TIMEOUT_S)
                verdict = self._health_verdict()
        if verdict is not None and verdict[0]:
            self._unhealthy(*verdict)
            return
        if self.state in (State.STARTING, State.FAILED) and verdict is None:
            return  # not (again) healthy yet
        try:
            await self._read_load()
        except grpc.aio.AioRpcError as e:
            self._unhealthy(
                f"{e.code().name}: {e.details()}", refused=e.code() == grpc.StatusCode.UNAVAILABLE
            )
            return
        if verdict is not None:  # healthy
            self._failures = 0
            if self.state in (State.STARTING, State.FAILED):  # a failed instance that answers again is back
                self.set_state(State.READY, "healthy")
        if self.role == "prefill" and self.decode_first:
            self.first_tokens.open()  # ready for its first request (again, if the stream ended)

    def _health_due(self) -> bool:
        if self.state in (State.STARTING, State.FAILED):
            return True
        return time.monotonic() - self._health_at >= HEALTH_EVERY_S

    def _health_verdict(self) -> tuple[str, bool] | None:
        """The finished health check's answer: ("", False) healthy, else (why not, refused); None
        while none has finished since the last poll."""
        if self._health is None or not self._health.done():
            return None
        task, self._health = self._health, None
        self._health_at = time.monotonic()
        return None if task.cancelled() else task.result()

    async def _check_health(self) -> tuple[str, bool]:
        start = time.monotonic()
        try:
            answer = await self.stub.HealthCheck(pb.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
            verdict = (
                ("", False) if answer.healthy else (f"HealthCheck says unhealthy: {answer.message}", False)
            )
        except grpc.aio.AioRpcError as e:
            verdict = f"HealthCheck: {e.code().name}: {e.details()}", e.code() == grpc.StatusCode.UNAVAILABLE
        self.health["checks"] += 1
        self.health["failures"] += bool(verdict[0])
        self.health["last_s"] = round(time.monotonic() - start, 3)
        return verdict

    async def _read_load(self) -> None:
        loads = await self.stub.GetLoads(pb.GetLoadsRequest(), timeout=RPC_TIMEOUT_S)
        self.loads = [
            DpLoad(
                ld.dp_rank,
                ld.num_running_reqs,
                ld.num_waiting_reqs,
                ld.num_used_tokens,
                ld.max_total_num_tokens,
                ld.disaggregation.kv_transfer_latency_ms,
                ld.disaggregation.kv_transfer_speed_gb_s,
            )
            for ld in loads.loads
        ]
        self.balancedness = await self._balancedness()
        if self.info is None:
            self.info = await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S)
            server = await self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=RPC_TIMEOUT_S)
            args = facts.server_args(server)
            self.ep_size = facts.ep_size(args) or len(self.loads)
            self.slots = facts.slots(args)
            self.decode_first = args.get(wire.SERVER_ARG) is True

    async def _balancedness(self) -> float | None:
        """From moeserve's WorkerControl.GetExpertLoad (other workers lack it: None): mean ÷ max
        tokens per EP rank under the placement in use (an expert's tokens split over its replicas)."""
        try:  # the stub class grpc_tools generates is unannotated
            res = await ctl_grpc.WorkerControlStub(self._channel).GetExpertLoad(  # type: ignore[no-untyped-call]
                ctl.GetExpertLoadRequest(), timeout=RPC_TIMEOUT_S
            )
        except grpc.aio.AioRpcError:
            return None
        return facts.balancedness(res)

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
        if self._health is not None:
            self._health.cancel()
            self._health = None
        if self._first_tokens is not None:
            await self._first_tokens.close()
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
            "slots": self.slots,
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
            "first_tokens": self._first_tokens is not None and self._first_tokens.live,
            "dp_ranks": [ld.__dict__ for ld in self.loads],
            "health": dict(self.health),
            "kv_events": dict(self.kv_events),
        }
