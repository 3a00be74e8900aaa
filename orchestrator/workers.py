"""gRPC clients for the workers (SGLang's scheduler protocol) and the pool they form."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Literal

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
Role = Literal["prefill", "decode"]
HEALTH_INTERVAL_S = 2.0


@dataclass(eq=False)
class Worker:
    """One worker as the orchestrator sees it: its gRPC stub, health and load."""

    role: Role
    address: str
    """host:port of the worker's gRPC server (for prefill also its bootstrap address)."""
    healthy: bool = False
    inflight: int = 0
    """Requests this orchestrator has in flight on the worker (the least-load signal)."""
    info: pb.GetModelInfoResponse | None = None
    _channel: grpc.aio.Channel | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def stub(self) -> pb_grpc.SglangSchedulerStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        return pb_grpc.SglangSchedulerStub(self._channel)

    async def check(self) -> bool:
        try:
            res = await self.stub.HealthCheck(pb.HealthCheckRequest(), timeout=2.0)
            if res.healthy and self.info is None:
                self.info = await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=2.0)
            self.healthy = res.healthy
        except grpc.aio.AioRpcError:
            self.healthy = False
        return self.healthy

    async def abort(self, request_id: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.stub.Abort(pb.AbortRequest(request_id=request_id, reason="client"), timeout=5.0)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class WorkerPool:
    """The prefill and decode workers, health-checked in the background."""

    def __init__(self, prefill: list[str], decode: list[str]):
        self.prefill = [Worker("prefill", a) for a in prefill]
        self.decode = [Worker("decode", a) for a in decode]
        self._task: asyncio.Task | None = None

    @property
    def all(self) -> list[Worker]:
        return self.prefill + self.decode

    @property
    def ready(self) -> bool:
        return any(w.healthy for w in self.prefill) and any(w.healthy for w in self.decode)

    def context_limit(self) -> int:
        """The smallest context of the workers that answered GetModelInfo (0 while none has)."""
        return min((w.info.max_context_length for w in self.all if w.info is not None), default=0)

    async def check_all(self) -> None:
        await asyncio.gather(*(w.check() for w in self.all))

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            await self.check_all()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*(w.close() for w in self.all))
