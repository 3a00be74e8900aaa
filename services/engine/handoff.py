"""The engine's side of a KV hand-off: requests whose prompt KV is written by another worker
(decode), and finished requests whose pages are still being read by one (prefill).

Decode: `add_remote_request` queues a request WAITING_FOR_KV; the scheduler reserves its pages
when the pool has room and hands them to the request's `KVSource`; `kv_arrived` records the
first token sampled by the prefill and the request joins the running batch when a seat is free.
Prefill: a request with a `KVListener` keeps its pages after it finishes until `release`.
Engine thread only (`Engine.handoff`; a KV connector drives it through the engine loop).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.engine.request import KVSource, Phase, RequestOutput
from services.engine.requests import RequestTable
from services.engine.sampling import SamplingParams, TokenLogprob
from services.engine.scheduler import Scheduler


class EngineHandoff:
    """The request API a KV connector drives, over the engine's requests and scheduler."""

    def __init__(self, requests: RequestTable, scheduler: Scheduler):
        self.requests, self.scheduler = requests, scheduler

    def add_remote_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None,
        source: KVSource,
    ) -> str:
        """Queue a request whose prompt KV `source` will write into the pages the scheduler reserves."""
        req = self.requests.new(prompt_token_ids, params, request_id)
        req.kv_source = source
        self.requests.live[req.request_id] = req
        self.scheduler.add_remote(req)
        return req.request_id

    def awaiting_pages(self, request_id: str) -> bool:
        """The request still waits for the scheduler to reserve its pages (nothing is in flight)."""
        req = self.requests.live.get(request_id)
        return req is not None and req.phase is Phase.WAITING_FOR_KV and not req.pages

    def kv_arrived(
        self, request_id: str, first_token: int, logprob: TokenLogprob | None = None
    ) -> RequestOutput | None:
        """The prompt KV is in the request's pages and prefill sampled `first_token` (with `logprob`).

        Returns the output for the first token (None if the request is gone); the request joins
        the running batch under `max_num_seqs`, or finishes here if that token ends it.
        """
        req = self.requests.live.get(request_id)
        if req is None or req.phase is not Phase.WAITING_FOR_KV or not req.pages:
            return None
        req.num_computed = len(req.prompt_ids)
        out = self.requests.took(req, first_token, logprob)
        if not out.finished:
            self.scheduler.add_ready(req)
        return out

    def release(self, request_id: str) -> bool:
        """Free the pages a finished request kept for its KV listener."""
        req = self.requests.held.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.drop_pages(req)  # through the prefix cache: its computed pages stay cached
        return True

    def strand(self, request_id: str) -> int:
        """Take a request's pages out of use for good (a remote writer may still reach them).

        Returns how many; the request itself can then be aborted as usual. They show as used pages.
        """
        req = self.requests.live.get(request_id)
        if req is None:
            return 0
        pages, req.pages = req.pages, []
        self.requests.stranded.extend(pages)
        return len(pages)
