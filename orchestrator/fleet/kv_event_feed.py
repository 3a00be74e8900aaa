"""Follows the prefill instances' KV events into the prefill policy (when it wants them).

For every ready prefill instance, one `SubscribeKvEvents` stream; each event goes to the
policy's `observe(instance_id, dp_rank, event)` (prefix affinity: blocks a rank now holds, or no
longer holds). A stream that breaks is opened again on the next check while the instance is
ready; an instance that does not implement the RPC is left alone; an instance that is no longer
ready is unsubscribed and its targets are forgotten.

Only moeserve workers are followed: their block hashes are the chain the policy indexes prompts by
(`services.common.prefix_hash`). SGLang's are another scheme (SHA-256 per page, one token per
page by default), which would match no prompt and only fill the index; until they are translated,
SGLang prefill instances are routed on this orchestrator's own decisions alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from smg_grpc_proto.generated import common_pb2

from orchestrator.fleet.registry import Instance, Registry, State

log = logging.getLogger(__name__)
CHECK_S = 1.0


class KvEventFeed:
    def __init__(self, registry: Registry, policy: object):
        self.registry, self.policy = registry, policy
        self._streams: dict[str, asyncio.Task[None]] = {}
        self._unsupported: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def wanted(self) -> bool:
        return hasattr(self.policy, "observe")

    async def start(self) -> None:
        if self.wanted:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._streams.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._streams.clear()

    async def _watch(self) -> None:
        while True:
            self.check()
            await asyncio.sleep(CHECK_S)

    def check(self) -> None:
        """Subscribe to new ready prefill instances; drop the ones no longer ready."""
        ready = {i.id: i for i in self.registry.prefill if i.state == State.READY}
        for inst_id in list(self._streams):
            if inst_id not in ready or self._streams[inst_id].done():
                self._streams.pop(inst_id).cancel()
                if inst_id not in ready:
                    self.policy.forget(inst_id, any_rank=True)  # type: ignore[attr-defined]
        for inst_id, inst in ready.items():
            if not inst.decode_first:  # not a moeserve worker (GetServerInfo says so): see above
                continue
            if inst_id not in self._streams and inst_id not in self._unsupported:
                self._streams[inst_id] = asyncio.get_running_loop().create_task(self._follow(inst))

    async def _follow(self, inst: Instance) -> None:
        try:
            async for batch in inst.stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest()):
                rank = batch.dp_rank if batch.HasField("dp_rank") else None
                for event in batch.events:
                    self.policy.observe(inst.id, rank, event)  # type: ignore[attr-defined]
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._unsupported.add(inst.id)
            else:
                log.info("KV events of %s (%s) stopped: %s", inst.id, inst.address, e.code().name)
