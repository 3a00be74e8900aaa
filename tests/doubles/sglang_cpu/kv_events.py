"""The fake scheduler's KV events, made with SGLang's own code: its event publisher (the ZMQ PUB the
servicer's SubscribeKvEvents relays, one port per DP rank) and its block hashes (`get_hash_str`,
SGLang's native SHA-256 chain, and `hash_str_to_int64`).

A rank caches a prompt's pages as SGLang's radix cache does: pages it already holds are not stored
again, and a new page's parent is the page before it (None under the root).
"""

from __future__ import annotations

import time
from typing import Any

from sglang.srt.disaggregation.kv_events import BlockStored, EventPublisherFactory, KVEventBatch
from sglang.srt.mem_cache.utils import get_hash_str, hash_str_to_int64


class KvEventSource:
    def __init__(self, server_args: Any, rank: int, page_size: int):
        self.publisher = EventPublisherFactory.create(server_args.kv_events_config, attn_dp_rank=rank)
        self.rank, self.page_size = rank, page_size
        self.held: set[int] = set()

    def stored(self, token_ids: list[int]) -> None:
        """The prompt's full pages are now in this rank's cache."""
        pages = len(token_ids) // self.page_size
        if pages == 0:
            return
        digests = get_hash_str(token_ids[: pages * self.page_size], None, page_size=self.page_size)
        hashes = [hash_str_to_int64(d) for d in digests]
        events = []
        for i, h in enumerate(hashes):
            if h in self.held:
                continue
            self.held.add(h)
            page = token_ids[i * self.page_size : (i + 1) * self.page_size]
            parent = hashes[i - 1] if i else None
            events.append(BlockStored(block_hashes=[h], parent_block_hash=parent, token_ids=page,
                                      block_size=len(page), lora_id=None, medium="GPU"))  # fmt: skip
        if events:
            self.publisher.publish(KVEventBatch(ts=time.time(), events=events, attn_dp_rank=self.rank))

    def close(self) -> None:
        self.publisher.shutdown()
