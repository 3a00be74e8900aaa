"""Follows the prefill instances' KV events into the prefill policy (when it wants them).

For every ready prefill instance, one `SubscribeKvEvents` stream; each event goes to the
policy's `observe(instance_id, dp_rank, event)` (prefix affinity: blocks a rank now holds, or no
longer holds). A stream that breaks is opened again on the next check while the instance is
ready; an instance that does not implement the RPC is left alone; an instance that is no longer
ready is unsubscribed and its targets are forgotten.

moeserve workers' block hashes are the chain the policy indexes prompts by
(`services.common.prefix_hash`); SGLang's are another scheme (SHA-256 per page, one token per
page by default), so their events go through `PageChains` first (bounded), which renames the
pages into the policy's blocks. A stream opened again starts that instance's pages afresh (the
servicer's relay replays what the rank holds). Each instance's `kv_events` counts the batches
and the index blocks stored and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from smg_grpc_proto.generated import common_pb2

from orchestrator.fleet.page_chains import PageChains
from orchestrator.fleet.registry import Instance, Registry, State

log = logging.getLogger(__name__)
CHECK_S = 1.0


class KvEventFeed:
    def __init__(self, registry: Registry, policy: object):
        self.registry, self.policy = registry, policy
        self._streams: dict[str, asyncio.Task[None]] = {}
        self._unsupported: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.pages = PageChains(getattr(policy, "block_tokens", 16))
        """SGLang workers' pages, followed to name them as the policy does."""

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
                    self.pages.forget(instance_id=inst_id)
        for inst_id, inst in ready.items():
            if inst_id not in self._streams and inst_id not in self._unsupported:
                self._streams[inst_id] = asyncio.get_running_loop().create_task(self._follow(inst))

    async def _follow(self, inst: Instance) -> None:
        sglang = not inst.decode_first  # GetServerInfo said it is not a moeserve worker
        self.pages.forget(instance_id=inst.id)
        try:
            async for batch in inst.stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest()):
                rank = batch.dp_rank if batch.HasField("dp_rank") else None
                inst.kv_events["batches"] += 1
                for event in batch.events:
                    ours = self.pages.translate((inst.id, rank), event) if sglang else event
                    if ours is None:
                        continue
                    kind = ours.WhichOneof("data")
                    if kind == "stored":
                        inst.kv_events["blocks_stored"] += len(ours.stored.blocks)
                    elif kind == "removed":
                        inst.kv_events["blocks_removed"] += len(ours.removed.block_hashes)
                    self.policy.observe(inst.id, rank, ours)  # type: ignore[attr-defined]
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._unsupported.add(inst.id)
            elif e.code() == grpc.StatusCode.DATA_LOSS:  # the relay lost events: start the worker over
                log.info("KV events of %s (%s) lost some: %s", inst.id, inst.address, e.details())
                self.policy.forget(inst.id, any_rank=True)  # type: ignore[attr-defined]
            else:
                log.info("KV events of %s (%s) stopped: %s", inst.id, inst.address, e.code().name)
