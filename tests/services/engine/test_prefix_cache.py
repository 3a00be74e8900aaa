"""Prefix caching in the engine: exact against a cold run, honest hit counts, safe eviction."""

from __future__ import annotations

import random

import pytest

from services.common.prefix_hash import block_hashes
from services.engine import Engine, SamplingParams
from services.engine.page_pool import PagePool
from services.engine.prefix_cache import PrefixCache
from tests.oracle import greedy_ids

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PAGE = 16


def prompt(seed: int, n: int, vocab: int = 300) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def run_one(engine: Engine, ids: list[int], params: SamplingParams = GREEDY):
    return engine.generate([ids], params)[0]


def check_pool(engine: Engine) -> None:
    """Every page is exactly one of: free, held by a live request, owned by the cache."""
    pool, cache = engine.pool, engine.prefix_cache
    free = set(pool._free)
    cached = {n.page for n in cache._nodes()} if cache else set()
    held = {p for r in engine.requests.live.values() for p in r.pages} | {
        p for r in engine.requests.held.values() for p in r.pages
    }
    assert len(free) == pool.num_free and not free & cached and not free & held
    assert free | cached | held == set(range(pool.num_pages))
    if cache is not None:
        assert len(cached) == cache.num_cached
        assert cache.num_evictable == sum(1 for n in cache._nodes() if n.refs == 0)


@pytest.mark.parametrize("shared", [5, PAGE, PAGE + 1, 3 * PAGE, 3 * PAGE + 7])
def test_shared_prefixes_of_every_alignment_are_exact(model_dir, shared):
    """A second prompt sharing `shared` leading tokens with the first gives the cold answer."""
    first = prompt(1, shared) + prompt(2, 20)
    second = prompt(1, shared) + prompt(3, 9)
    warm = Engine.from_pretrained(model_dir)
    cold = Engine.from_pretrained(model_dir, prefix_cache=False)
    run_one(warm, first)
    out = run_one(warm, second)
    assert out.output_token_ids == run_one(cold, second).output_token_ids
    assert out.cached_tokens == (shared // PAGE) * PAGE
    check_pool(warm)


def test_the_same_prompt_twice_reuses_all_but_its_last_token(ds_dir):
    ids = prompt(4, 2 * PAGE)  # exactly two pages: the second page's last token is recomputed
    engine = Engine.from_pretrained(ds_dir)
    a, b = run_one(engine, ids), run_one(engine, ids)
    assert a.output_token_ids == b.output_token_ids == greedy_ids(ds_dir, ids, GREEDY.max_tokens)
    assert (a.cached_tokens, b.cached_tokens) == (0, PAGE)  # at most prompt - 1 tokens, page-aligned
    ids3 = ids + prompt(5, 3)
    assert run_one(engine, ids3).cached_tokens == 2 * PAGE


def test_a_200_token_prefix_is_found_and_only_the_suffix_computed(ds_dir):
    engine = Engine.from_pretrained(ds_dir, max_prefill_tokens=64)
    system = prompt(6, 200)
    first = run_one(engine, system + prompt(7, 30))
    assert first.cached_tokens == 0
    before = engine.stats.snapshot().tokens["prefill"]
    second_ids = system + prompt(8, 25)
    second = run_one(engine, second_ids)
    computed = engine.stats.snapshot().tokens["prefill"] - before
    assert 192 <= second.cached_tokens <= 200
    assert computed == len(second_ids) - second.cached_tokens  # the worker's own counter
    assert second.output_token_ids == greedy_ids(ds_dir, second_ids, GREEDY.max_tokens)
    assert run_one(engine, prompt(9, 50)).cached_tokens == 0  # a cold prompt
    assert engine.scheduler.cached_tokens == second.cached_tokens


def test_a_full_pool_evicts_unused_pages_and_never_those_in_use(ds_dir):
    """Room for about three prompts: twelve distinct prefixes, four at a time, all exact."""
    engine = Engine.from_pretrained(ds_dir, kv_pool_tokens=12 * PAGE, max_prefill_tokens=32)
    cold = Engine.from_pretrained(ds_dir, prefix_cache=False)
    prompts = [prompt(100 + i, 2 * PAGE + 5) for i in range(12)]
    for start in range(0, 12, 4):
        batch = prompts[start : start + 4]
        outs = engine.generate(batch, GREEDY)
        check_pool(engine)
        for ids, out in zip(batch, outs, strict=True):
            assert out.output_token_ids == run_one(cold, ids).output_token_ids
    stats = engine.kv_stats()
    assert stats.cached_pages > 0 and stats.free_pages + stats.evictable_pages == stats.total_pages
    again = run_one(engine, prompts[-1])  # the most recent prefix survived eviction
    assert again.cached_tokens == 2 * PAGE


def test_aborts_mid_prefill_leave_the_tree_consistent(ds_dir):
    engine = Engine.from_pretrained(ds_dir, page_size=4, max_prefill_tokens=8)
    cold = Engine.from_pretrained(ds_dir, page_size=4, prefix_cache=False)
    ids = prompt(11, 30)
    rid = engine.add_request(ids, GREEDY)
    engine.step()
    engine.step()  # 16 of 30 prompt tokens computed
    assert engine.abort(rid).finish_reason == "abort"
    check_pool(engine)
    assert engine.prefix_cache.num_cached == 4  # the computed pages were kept
    out = run_one(engine, ids)
    assert out.cached_tokens == 16 and out.output_token_ids == run_one(cold, ids).output_token_ids
    check_pool(engine)


def test_random_traffic_keeps_every_page_accounted_for(ds_dir):
    """Arrivals, aborts and finishes at random over a small pool with shared prefixes."""
    rng = random.Random(0)
    engine = Engine.from_pretrained(ds_dir, page_size=4, kv_pool_tokens=160, max_prefill_tokens=16)
    heads = [prompt(200 + i, 12) for i in range(3)]
    live: list[str] = []
    for step in range(120):
        if rng.random() < 0.4 and len(live) < 6:
            params = SamplingParams(max_tokens=rng.randint(1, 8), temperature=0.0, ignore_eos=True)
            ids = rng.choice(heads)[: rng.randint(1, 12)] + prompt(1000 + step, rng.randint(1, 10))
            live.append(engine.add_request(ids, params))
        if live and rng.random() < 0.1:
            engine.abort(live.pop(rng.randrange(len(live))))
        for out in engine.step():
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
        check_pool(engine)
    while engine.has_unfinished():
        engine.step()
    check_pool(engine)
    assert engine.kv_stats().used_pages == 0 and engine.scheduler.cached_tokens > 0


def test_the_cache_alone_evicts_least_recently_used_leaves_first():
    pool = PagePool(8, 2)
    cache = PrefixCache(pool)
    a, b = pool.allocate(2), pool.allocate(2)
    held_a = cache.insert([1, 2, 3, 4], a, [], 4)
    held_b = cache.insert([1, 2, 9, 9], b, [], 4)  # shares the first page with a
    cache.release(a, held_a)
    cache.release(b, held_b)  # b's copy of page [1, 2] goes back to the pool
    assert cache.num_cached == 3 and cache.num_evictable == 3 and pool.num_free == 5
    path = cache.match([1, 2, 3, 4, 5])
    cache.lock(path)  # [1,2] -> [3,4] in use: only [9,9] may go
    assert cache.evict(3) == 1 and cache.num_cached == 2
    cache.unlock(path)
    assert pool.num_available == 8 and len(pool.allocate(8)) == 8 and cache.num_cached == 0


def test_the_cache_reports_stored_and_removed_blocks_by_their_chained_hashes(ds_dir):
    events: list[tuple[str, list[int], int]] = []
    engine = Engine.from_pretrained(ds_dir, page_size=4)
    engine.prefix_cache.events = lambda kind, hashes, parent: events.append((kind, hashes, parent))
    ids = prompt(21, 10)
    run_one(engine, ids)  # 10 prompt tokens: 2 full pages when the prompt is done, more at the end
    hashes = block_hashes(ids, 4)
    assert events[0] == ("stored", hashes[:2], 0)
    longer = ids + prompt(22, 6)
    run_one(engine, longer)
    under = [hs[0] for kind, hs, parent in events if kind == "stored" and parent == hashes[1]]
    assert block_hashes(longer, 4)[2] in under  # the longer prompt's third page hangs under the second
    engine.prefix_cache.clear()
    removed = {h for kind, hs, _ in events if kind == "removed" for h in hs}
    assert removed == {h for kind, hs, _ in events if kind == "stored" for h in hs}
