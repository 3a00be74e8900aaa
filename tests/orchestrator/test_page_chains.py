"""SGLang's KV events renamed into the prefix index's blocks (`orchestrator/fleet/page_chains.py`).

The events are made as SGLang's radix cache makes them: a page already held is not stored again,
and a new page's parent is the page before it. The page hashes are opaque to the translator, so
here they are a SHA-256 chain of our own; `tests/e2e/test_sglang.py` follows events made with
SGLang's own hashes, publisher and relay.
"""

from __future__ import annotations

import hashlib
import random
from array import array

import pytest
from smg_grpc_proto.generated import common_pb2

from orchestrator.dispatch.policies.prefix_affinity import PrefixAffinity
from orchestrator.fleet.page_chains import PageChains
from services.common.prefix_hash import block_hashes

BLOCK = 16
TARGET = ("prefill-0", 1)


def page_hashes(tokens: list[int], page: int) -> list[int]:
    """Signed 64-bit ids of the whole pages, each naming its prefix (as SGLang's chain does)."""
    out, parent = [], b""
    for start in range(0, len(tokens) - len(tokens) % page, page):
        parent = hashlib.sha256(parent + array("I", tokens[start : start + page]).tobytes()).digest()
        out.append(int.from_bytes(parent[:8], "little", signed=True))
    return out


class Rank:
    """One SGLang rank's radix cache, as far as its events go."""

    def __init__(self, page: int):
        self.page, self.held = page, set()

    def store(self, tokens: list[int], **fields) -> common_pb2.KvCacheEvent:
        hashes = page_hashes(tokens, self.page)
        new = [i for i, h in enumerate(hashes) if h not in self.held]
        self.held |= set(hashes)
        blocks = [
            common_pb2.KvBlock(block_hash=hashes[i], token_ids=tokens[i * self.page : (i + 1) * self.page])
            for i in new
        ]
        stored = common_pb2.KvBlocksStored(blocks=blocks, **fields)
        if new and new[0] > 0:
            stored.parent_block_hash = hashes[new[0] - 1]
        return common_pb2.KvCacheEvent(stored=stored)

    def evict(self, tokens: list[int], keep: int) -> common_pb2.KvCacheEvent:
        """Evict the pages past the first `keep` tokens, leaves first."""
        gone = page_hashes(tokens, self.page)[keep // self.page :][::-1]
        self.held -= set(gone)
        return common_pb2.KvCacheEvent(removed=common_pb2.KvBlocksRemoved(block_hashes=gone))


def stored_hashes(event: common_pb2.KvCacheEvent | None) -> list[int]:
    return [] if event is None else [b.block_hash for b in event.stored.blocks]


def removed_hashes(event: common_pb2.KvCacheEvent | None) -> list[int]:
    return [] if event is None else list(event.removed.block_hashes)


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50_000) for _ in range(n)]


@pytest.mark.parametrize("page", [1, 4, 16, 32])
def test_a_prompt_s_pages_become_the_index_blocks_the_router_computes_from_it(page):
    chains, rank, tokens = PageChains(BLOCK), Rank(page), prompt(70)
    got = stored_hashes(chains.translate(TARGET, rank.store(tokens)))
    whole = len(tokens) - len(tokens) % page  # SGLang caches whole pages only
    assert got == block_hashes(tokens[:whole], BLOCK)


@pytest.mark.parametrize("page", [1, 4])
def test_a_prompt_sharing_a_cached_prefix_continues_its_chain(page):
    chains, rank = PageChains(BLOCK), Rank(page)
    first = prompt(40, seed=1)
    second = first[:20] + prompt(30, seed=2)
    chains.translate(TARGET, rank.store(first))
    event = rank.store(second)
    assert event.stored.parent_block_hash  # SGLang stores only the new pages, under the shared one
    got = stored_hashes(chains.translate(TARGET, event))
    assert got == block_hashes(second, BLOCK)[1:]  # block 0 (tokens 0-15) was already there


def test_the_policy_sends_a_repeated_prompt_to_the_rank_whose_events_named_it():
    policy, chains, rank = PrefixAffinity(block_tokens=BLOCK), PageChains(BLOCK), Rank(1)
    tokens = prompt(48, seed=3)
    policy.observe(*TARGET, chains.translate(TARGET, rank.store(tokens)))

    class Ready:
        def __init__(self, id: str, ranks: int):
            self.id, self.inflight, self.loads = id, 0, [None] * ranks

    inst, rank_picked = policy.pick([Ready("prefill-1", 2), Ready("prefill-0", 2)], [*tokens, 7, 8])
    assert (inst.id, rank_picked) == TARGET


def test_evicted_pages_remove_the_blocks_they_completed():
    chains, rank, tokens = PageChains(BLOCK), Rank(1), prompt(48, seed=4)
    chains.translate(TARGET, rank.store(tokens))
    ours = block_hashes(tokens, BLOCK)
    assert removed_hashes(chains.translate(TARGET, rank.evict(tokens, keep=40))) == [ours[2]]
    assert removed_hashes(chains.translate(TARGET, rank.evict(tokens, keep=40))) == []  # already gone
    assert removed_hashes(chains.translate(TARGET, rank.evict(tokens, keep=33))) == []  # block 2 ends at 48
    assert removed_hashes(chains.translate(TARGET, rank.evict(tokens, keep=16))) == [ours[1]]
    assert len(chains) == 16


def test_evicting_pages_that_complete_no_block_says_nothing():
    chains, rank, tokens = PageChains(BLOCK), Rank(1), prompt(40, seed=5)
    chains.translate(TARGET, rank.store(tokens))
    assert chains.translate(TARGET, rank.evict(tokens, keep=33)) is None  # tokens 33-39: no block ends


def test_pages_under_an_unknown_parent_are_skipped_not_guessed():
    chains, rank, tokens = PageChains(BLOCK), Rank(1), prompt(40, seed=6)
    rank.store(tokens[:20])  # stored before this subscriber followed the rank
    assert chains.translate(TARGET, rank.store(tokens)) is None
    assert chains.skipped == 20 and len(chains) == 0


def test_each_rank_has_its_own_pages():
    chains, tokens = PageChains(BLOCK), prompt(40, seed=7)
    a, b = Rank(1), Rank(1)
    chains.translate(("p", 0), a.store(tokens[:20]))
    assert chains.translate(("p", 1), b.store(tokens[:10])) is None  # no whole block: nothing to say
    assert len(chains) == 30  # its own root, its own pages
    a_rest = a.store(tokens)
    assert chains.translate(("p", 1), a_rest) is None  # rank 1 never held rank 0's page 19


def test_the_pages_followed_are_bounded_and_the_oldest_go_first():
    chains, rank = PageChains(BLOCK, max_pages=48), Rank(1)
    old, new = prompt(48, seed=8), prompt(48, seed=9)
    chains.translate(TARGET, rank.store(old))
    chains.translate(TARGET, rank.store(new))
    assert len(chains) == 48
    old_more, new_more = [*old, *[1] * 16], [*new, *[1] * 16]
    assert chains.translate(TARGET, rank.store(old_more)) is None  # its parent went first
    assert stored_hashes(chains.translate(TARGET, rank.store(new_more))) == block_hashes(new_more, BLOCK)[3:]


@pytest.mark.parametrize(
    "fields, block_fields",
    [
        (dict(tier=common_pb2.KV_CACHE_TIER_HOST), {}),
        (dict(medium="CPU_PINNED"), {}),
        ({}, dict(lora_id=3)),
    ],
)
def test_host_tiers_and_adapters_are_not_plain_device_prefixes(fields, block_fields):
    chains, rank = PageChains(BLOCK), Rank(1)
    event = rank.store(prompt(32, seed=10), **fields)
    for block in event.stored.blocks:
        for k, v in block_fields.items():
            setattr(block, k, v)
    assert chains.translate(TARGET, event) is None


def test_a_cleared_cache_forgets_the_rank_s_pages():
    chains, rank, tokens = PageChains(BLOCK), Rank(1), prompt(32, seed=11)
    chains.translate(TARGET, rank.store(tokens))
    cleared = common_pb2.KvCacheEvent(cleared=common_pb2.KvCacheCleared())
    assert chains.translate(TARGET, cleared) == cleared
    assert len(chains) == 0


def test_a_page_stored_twice_needs_two_removals():
    chains, rank, tokens = PageChains(BLOCK), Rank(16), prompt(16, seed=12)
    event = rank.store(tokens)
    assert stored_hashes(chains.translate(TARGET, event)) == block_hashes(tokens, BLOCK)
    assert chains.translate(TARGET, event) is None  # a second copy: nothing new for the index
    removal = rank.evict(tokens, keep=0)
    assert chains.translate(TARGET, removal) is None
    assert removed_hashes(chains.translate(TARGET, removal)) == block_hashes(tokens, BLOCK)
