"""The prefix cache's RPCs of SGLang's scheduler service: SubscribeKvEvents and FlushCache.

SubscribeKvEvents streams every DP rank's stored and removed blocks (hashes of
`services.common.prefix_hash`, one `KvEventBatch` per rank and poll) for as long as the subscriber stays;
a rank whose events the subscriber missed gets a `KvCacheCleared` first. The orchestrator's
prefix-affinity index follows it; SMG's event-driven cache-aware routing can too. FlushCache drops
every rank's unused cached pages (pages in use stay; it never waits).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from smg_grpc_proto.generated import common_pb2

from services.common.calls import CallError
from services.worker import messages as msg
from services.worker import proto_convert
from services.worker.front.dp_controller import DPController

POLL_S = 0.05
"""How often a subscription asks the ranks for new events."""
TIMEOUT_S = 5.0


class PrefixCacheRpcs:
    """SubscribeKvEvents and FlushCache over every DP rank (`SchedulerServicer` serves them)."""

    def __init__(self, controller: DPController, page_size: int):
        self.ctl, self.page_size = controller, page_size

    def subscribe(
        self, request: common_pb2.SubscribeKvEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.KvEventBatch]:
        block = self.page_size
        cursors = [0] * self.ctl.size
        number = request.start_sequence_number
        while context.is_active():
            sent = False
            for rank in range(self.ctl.size):
                try:
                    page = self._ask_rank(rank, lambda cid, r=rank: msg.KvEvents(cid, cursors[r]))
                except CallError as e:
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"EP rank {rank}: {e.message}")
                events = list(page.events)
                if page.lost:
                    events.insert(0, msg.KvEvent(0, "cleared", ()))
                cursors[rank] = page.next_seq
                if events:
                    number += 1
                    sent = True
                    yield common_pb2.KvEventBatch(
                        sequence_number=number, timestamp=time.time(), dp_rank=rank,
                        events=[proto_convert.kv_event(e, block) for e in events],
                    )  # fmt: skip
            if not sent:
                time.sleep(POLL_S)

    def flush(self) -> common_pb2.FlushCacheResponse:
        try:
            freed = [self._ask_rank(r, lambda cid: msg.FlushCache(cid)) for r in range(self.ctl.size)]
        except CallError as e:
            return common_pb2.FlushCacheResponse(success=False, message=e.message)
        return common_pb2.FlushCacheResponse(
            success=True, message=f"dropped {sum(freed)} unused cached pages (pages in use stay)"
        )

    def _ask_rank(self, rank: int, command: Callable[..., msg.Command]) -> Any:
        return self.ctl.call(rank, command).result(TIMEOUT_S)
