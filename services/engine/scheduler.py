"""Continuous batching with chunked prefill, for one DP rank.

Each step is either a prefill step (prompt chunks within a token budget: first the requests
already part-way through their prompt, then newly admitted ones in arrival order) or a decode
step (one token for every request that has finished its prompt). Requests join and leave the
running batch at any step.

KV pages: admission reserves the pages for the whole prompt, so a prompt's chunks never wait
for memory. Decode grows a request by one page at a time; when the pool is empty the newest
running request is preempted (pages freed, recomputed later from prompt + output), so running
requests are never corrupted and the pool never over-commits.

Requests whose prompt KV comes from another worker (the decode side of a KV hand-off) pass
through WAITING_FOR_KV: the scheduler reserves their pages when the pool has room (first come,
first served, at most `max_num_seqs` in transfer at once), the KV connector fills them, and the
scheduler admits them to the running batch under `max_num_seqs` once the KV has arrived.

With a prefix cache, admission takes the longest cached page-aligned prefix (its pages are
shared, the request computes the rest), a computed prompt's full pages are inserted into the
cache, and a request's pages go back through the cache when it ends; cached pages nobody uses
count as available and are evicted on demand.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from services.engine.page_pool import PagePool
from services.engine.prefix_cache import Node, PrefixCache
from services.engine.request import FinishReason, Phase, Request


@dataclass(frozen=True)
class ScheduledBatch:
    """What one step computes: a prefill (prompt chunks) or a decode (one token each)."""

    phase: Literal["prefill", "decode"]
    requests: list[Request]
    num_new: list[int]
    """Tokens to compute per request this step, starting at its `num_computed`."""


class Scheduler:
    """Continuous batching of one DP rank: admission, chunked prefill, decode, preemption, hand-off."""

    def __init__(
        self, pool: PagePool, max_num_seqs: int, max_prefill_tokens: int, cache: PrefixCache | None = None
    ):
        self.pool = pool
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        """Requests holding pages, in admission order (prefill or decode phase)."""
        self.kv_waiting: deque[Request] = deque()
        """WAITING_FOR_KV requests without pages yet, in arrival order."""
        self.kv_transferring: list[Request] = []
        """WAITING_FOR_KV requests whose pages are reserved and being filled from elsewhere."""
        self.kv_ready: deque[Request] = deque()
        """KV_READY requests: prompt KV in place, waiting for a seat in the running batch."""
        self.num_preemptions = 0
        self.prompt_tokens = 0
        """Prompt tokens admitted (first admissions), and of those, found in the prefix cache:"""
        self.cached_tokens = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def add_remote(self, req: Request) -> None:
        """Queue a request whose prompt KV will be written into its pages by another worker."""
        req.phase = Phase.WAITING_FOR_KV
        self.kv_waiting.append(req)

    def add_ready(self, req: Request) -> None:
        """A request whose prompt KV is in its pages and first token sampled: it waits for a seat."""
        if req in self.kv_transferring:
            self.kv_transferring.remove(req)
        req.phase = Phase.KV_READY
        self.kv_ready.append(req)

    def has_work(self) -> bool:
        """Whether a step would compute something or move a request along."""
        return bool(self.running or self.kv_ready or self._can_admit() or self._can_reserve())

    def _can_admit(self) -> bool:
        """The head of the queue fits the pool now (otherwise only a freed page can change that)."""
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return False
        head = self.waiting[0]
        if self.pool.pages_for(head.num_tokens) <= self.pool.num_available:
            return True  # fits even without a cached prefix: no need to walk the cache
        return self._fit(head) is not None

    def _fit(self, req: Request) -> tuple[list[Node], int] | None:
        """(cached path, new pages) to admit `req` now, or None if the pool cannot hold it."""
        path = self.cache.match(req.tokens(0, req.num_tokens)) if self.cache is not None else []
        need = self.pool.pages_for(req.num_tokens) - len(path)
        # a non-empty path came from the cache, so the cache is set there
        available = self.pool.num_available - (self.cache.evictable_among(path) if path else 0)  # type: ignore[union-attr]
        return (path, need) if need <= available else None

    def _admit(self, req: Request, path: list[Node], need: int) -> None:
        if self.cache is not None:
            self.cache.lock(path)
        req.cached = path
        req.pages = [node.page for node in path] + self.pool.allocate(need)
        req.num_computed = len(path) * self.pool.page_size
        if not req.output_ids:  # a first admission (a preempted request was counted already)
            req.cached_tokens = req.num_computed
            self.prompt_tokens += len(req.prompt_ids)
            self.cached_tokens += req.num_computed

    def reserve_remote(self) -> list[Request]:
        """Reserve pages for waiting hand-off requests while the pool has room; returns those served."""
        served = []
        while self._can_reserve():
            req = self.kv_waiting.popleft()
            req.pages = self.pool.allocate(self.pool.pages_for(len(req.prompt_ids)))
            self.kv_transferring.append(req)
            served.append(req)
        return served

    def _can_reserve(self) -> bool:
        if not self.kv_waiting or len(self.kv_transferring) + len(self.kv_ready) >= self.max_num_seqs:
            return False
        return self.pool.pages_for(len(self.kv_waiting[0].prompt_ids)) <= self.pool.num_available

    def schedule(self) -> ScheduledBatch | None:
        while self.kv_ready and len(self.running) < self.max_num_seqs:
            req = self.kv_ready.popleft()
            req.phase = Phase.DECODE
            self.running.append(req)
        return self._schedule_prefill() or self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.max_prefill_tokens
        reqs: list[Request] = []
        num_new: list[int] = []
        for req in self.running:
            if req.phase is Phase.PREFILL and budget > 0:
                n = min(budget, req.num_tokens - req.num_computed)
                reqs.append(req)
                num_new.append(n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            fit = self._fit(req)
            if fit is None:
                break  # first come, first served: later arrivals do not overtake
            self.waiting.popleft()
            self._admit(req, *fit)
            req.phase = Phase.PREFILL
            self.running.append(req)
            n = min(budget, req.num_tokens - req.num_computed)
            reqs.append(req)
            num_new.append(n)
            budget -= n
        return ScheduledBatch("prefill", reqs, num_new) if reqs else None

    def _schedule_decode(self) -> ScheduledBatch | None:
        reqs: list[Request] = []
        for req in list(self.running):
            if req.phase is not Phase.DECODE:
                continue
            # The step writes the KV of the token at index num_tokens - 1.
            while len(req.pages) < self.pool.pages_for(req.num_tokens) and req.phase is Phase.DECODE:
                if self.pool.num_available == 0:
                    self._preempt(self._newest_decoding())
                else:
                    req.pages += self.pool.allocate(1)
            if req.phase is Phase.DECODE:
                reqs.append(req)
        return ScheduledBatch("decode", reqs, [1] * len(reqs)) if reqs else None

    def _newest_decoding(self) -> Request:
        return next(r for r in reversed(self.running) if r.phase is Phase.DECODE)

    def _preempt(self, req: Request) -> None:
        self._release(req)
        req.num_computed = 0
        req.phase = Phase.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        self.drop_pages(req)

    def drop_pages(self, req: Request) -> None:
        """Give a request's pages back: through the prefix cache (which keeps the full pages of
        what was computed), or to the pool."""
        if self.cache is None:
            self.pool.free(req.pages)
        elif req.pages:
            self.cache.release(req.pages, self._cache_computed(req))
        req.pages, req.cached = [], []

    def _cache_computed(self, req: Request) -> list[Node]:
        """Insert the full pages of the request's computed tokens; its path in the cache."""
        assert self.cache is not None
        return self.cache.insert(req.tokens(0, req.num_computed), req.pages, req.cached, req.num_computed)

    def to_decode(self, req: Request) -> None:
        """The request's prompt is computed and its first token sampled: its full pages join the
        prefix cache now (concurrent requests with the same prefix can use them at once)."""
        req.phase = Phase.DECODE
        if self.cache is not None:
            req.cached = self._cache_computed(req)

    def finish(self, req: Request, reason: FinishReason, keep_pages: bool = False) -> None:
        """End a request (finished or aborted); its pages go back to the pool unless `keep_pages`."""
        for queue in (self.waiting, self.running, self.kv_waiting, self.kv_transferring, self.kv_ready):
            if req in queue:
                queue.remove(req)
        if req.pages and not keep_pages:
            self.drop_pages(req)
        req.phase = Phase.FINISHED
        req.finish_reason = reason
