"""SGLang's KV events, renamed into the prefix index's block scheme.

SGLang names a cached page by a SHA-256 chain over pages (one token per page by default); the
prefix index names a prefix by the BLAKE2b chain over `block_tokens`-token blocks
(`services.common.prefix_hash`). The two cannot be converted hash for hash, but every stored
page arrives with its token ids and its parent page's hash, so `PageChains` follows each
(instance, DP rank)'s pages from the root: per page, the index's hash of the last whole block up
to it, the tokens since, and the index blocks the page completed. A page's store becomes a store
of the blocks it completes; its removal (SGLang evicts leaves first) removes them.

Bounded: at most `max_pages` pages are followed in all (262,144 by default, about 400 bytes
each: some 100 MB; with SGLang's FlashMLA page of 64 tokens that is 16M tokens), the least
recently stored or extended out. A page whose parent is not followed (evicted here, stored
before the subscription, or under a LoRA adapter, extra keys or another tier than the
device's) is skipped, and so are the pages under it: the index then learns less, never a
prefix a rank does not hold. An evicted page's blocks stay indexed until the index's own LRU
drops them (the index is approximate; a stale target costs one cache miss).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from smg_grpc_proto.generated import common_pb2

from services.common.prefix_hash import next_hash

Target = tuple[str, int | None]
"""(instance id, DP rank): each rank has its own cache and its own pages."""
ROOT = (0, ())
"""The chain state before any token: no block hashed yet, no tokens pending."""
DEVICE_TIERS = (common_pb2.KV_CACHE_TIER_UNSPECIFIED, common_pb2.KV_CACHE_TIER_DEVICE)


@dataclass(slots=True)
class _Page:
    chain: int
    """The index's hash of the last whole block up to and including this page (0: none yet)."""
    tail: tuple[int, ...]
    """Tokens after that block."""
    completed: tuple[int, ...]
    """Index blocks this page completed."""
    copies: int = 1
    """Stores not yet removed (the same page stored again, e.g. by another cache level)."""


class PageChains:
    def __init__(self, block_tokens: int, max_pages: int = 1 << 18):
        if block_tokens < 1 or max_pages < 1:
            raise ValueError("PageChains needs block_tokens >= 1 and max_pages >= 1")
        self.block_tokens, self.max_pages = block_tokens, max_pages
        self._pages: OrderedDict[tuple[Target, int], _Page] = OrderedDict()
        self.skipped = 0
        """Pages not followed since the start (unknown parent or not a plain device prefix)."""

    def __len__(self) -> int:
        return len(self._pages)

    def translate(self, target: Target, event: common_pb2.KvCacheEvent) -> common_pb2.KvCacheEvent | None:
        """The event in the index's scheme, or None when it says nothing the index can use."""
        kind = event.WhichOneof("data")
        if kind == "stored":
            blocks = self._stored(target, event.stored)
            if blocks:
                stored = common_pb2.KvBlocksStored(blocks=[common_pb2.KvBlock(block_hash=h) for h in blocks])
                return common_pb2.KvCacheEvent(event_id=event.event_id, stored=stored)
        elif kind == "removed":
            gone = self._removed(target, event.removed)
            if gone:
                removed = common_pb2.KvBlocksRemoved(block_hashes=gone)
                return common_pb2.KvCacheEvent(event_id=event.event_id, removed=removed)
        elif kind == "cleared":
            self.forget(target)
            return event
        return None

    def forget(self, target: Target | None = None, instance_id: str | None = None) -> None:
        """Stop following a rank's pages (or every rank's of `instance_id`)."""
        for key in [
            k for k in self._pages if k[0] == target or (instance_id is not None and k[0][0] == instance_id)
        ]:
            del self._pages[key]

    def _stored(self, target: Target, stored: common_pb2.KvBlocksStored) -> list[int]:
        plain = stored.tier in DEVICE_TIERS and not (stored.HasField("medium") and stored.medium != "GPU")
        parent = stored.parent_block_hash if stored.HasField("parent_block_hash") else None
        state = ROOT if parent is None else self._state(target, parent)
        out: list[int] = []
        for block in stored.blocks:
            if state is None or not plain or block.HasField("lora_id") or block.extra_keys:
                self.skipped += 1
                state = None  # nor anything under it in this event
                continue
            key = (target, block.block_hash)
            known = self._pages.get(key)
            if known is not None:  # stored again: same tokens, same chain
                known.copies += 1
                self._pages.move_to_end(key)
                state = (known.chain, known.tail)
                continue
            chain, tail = state
            tokens = tail + tuple(block.token_ids)
            done = []
            while len(tokens) >= self.block_tokens:
                chain = next_hash(chain, tokens[: self.block_tokens])
                done.append(chain)
                tokens = tokens[self.block_tokens :]
            self._pages[key] = _Page(chain, tokens, tuple(done))
            out += done
            state = (chain, tokens)
        while len(self._pages) > self.max_pages:
            self._pages.popitem(last=False)
        return out

    def _state(self, target: Target, page_hash: int) -> tuple[int, tuple[int, ...]] | None:
        page = self._pages.get((target, page_hash))
        if page is None:
            return None
        self._pages.move_to_end((target, page_hash))  # a prefix still in use
        return page.chain, page.tail

    def _removed(self, target: Target, removed: common_pb2.KvBlocksRemoved) -> list[int]:
        if removed.tier not in DEVICE_TIERS or (removed.HasField("medium") and removed.medium != "GPU"):
            return []
        out: list[int] = []
        for h in removed.block_hashes:
            page = self._pages.get((target, h))
            if page is None:
                continue
            page.copies -= 1
            if page.copies == 0:
                del self._pages[(target, h)]
                out += page.completed
        return out
