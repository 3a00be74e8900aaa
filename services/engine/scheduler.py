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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from services.engine.page_pool import PagePool
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

    def __init__(self, pool: PagePool, max_num_seqs: int, max_prefill_tokens: int):
        self.pool = pool
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
        return self.pool.pages_for(self.waiting[0].num_tokens) <= self.pool.num_free

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
        return self.pool.pages_for(len(self.kv_waiting[0].prompt_ids)) <= self.pool.num_free

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
            need = self.pool.pages_for(req.num_tokens)
            if need > self.pool.num_free:
                break  # first come, first served: later arrivals do not overtake
            self.waiting.popleft()
            req.pages = self.pool.allocate(need)
            req.phase = Phase.PREFILL
            self.running.append(req)
            n = min(budget, req.num_tokens)
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
                if self.pool.num_free == 0:
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
        if req.pages:
            self.pool.free(req.pages)
            req.pages = []

    def to_decode(self, req: Request) -> None:
        """The request's prompt is computed and its first token sampled."""
        req.phase = Phase.DECODE

    def finish(self, req: Request, reason: FinishReason, keep_pages: bool = False) -> None:
        """End a request (finished or aborted); its pages go back to the pool unless `keep_pages`."""
        for queue in (self.waiting, self.running, self.kv_waiting, self.kv_transferring, self.kv_ready):
            if req in queue:
                queue.remove(req)
        if req.pages and not keep_pages:
            self.pool.free(req.pages)
            req.pages = []
        req.phase = Phase.FINISHED
        req.finish_reason = reason
