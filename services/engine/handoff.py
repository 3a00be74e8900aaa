"""The engine's side of a KV hand-off: requests whose prompt KV is written by another worker
(decode), and finished requests whose pages are still being read by one (prefill).

Decode: `add_remote_request` queues a request WAITING_FOR_KV; the scheduler reserves its pages
when the pool has room and hands them to the request's `KVSource`; `kv_arrived` records the
first token sampled by the prefill and the request joins the running batch when a seat is free.
Prefill: a request with a `KVListener` keeps its pages after it finishes until `release`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.engine.request import InvalidRequestError, KVSource, Phase, Request, RequestOutput
from services.engine.sampling import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from services.engine.engine import Engine


class KVHandoffHooks:
    """Mixed into `Engine`: the request API a KV connector drives (engine thread only)."""

    def add_remote_request(
        self: Engine,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None,
        source: KVSource,
    ) -> str:
        """Queue a request whose prompt KV `source` will write into the pages the scheduler reserves."""
        req = self._new_request(prompt_token_ids, params, request_id)
        req.kv_source = source
        self._requests[req.request_id] = req
        self.scheduler.add_remote(req)
        return req.request_id

    def awaiting_pages(self: Engine, request_id: str) -> bool:
        """The request still waits for the scheduler to reserve its pages (nothing is in flight)."""
        req = self._requests.get(request_id)
        return req is not None and req.phase is Phase.WAITING_FOR_KV and not req.pages

    def kv_arrived(
        self: Engine, request_id: str, first_token: int, logprob: TokenLogprob | None = None
    ) -> RequestOutput | None:
        """The prompt KV is in the request's pages and prefill sampled `first_token` (with `logprob`).

        Returns the output for the first token (None if the request is gone); the request joins
        the running batch under `max_num_seqs`, or finishes here if that token ends it.
        """
        req = self._requests.get(request_id)
        if req is None or req.phase is not Phase.WAITING_FOR_KV or not req.pages:
            return None
        return self._arrive(req, first_token, logprob)

    def reserve_pages(self: Engine, num_tokens: int) -> list[int] | None:
        """Pages for `num_tokens` of KV written from elsewhere, outside the scheduler; None if full."""
        need = self.pool.pages_for(num_tokens)
        return self.pool.allocate(need) if need <= self.pool.num_available else None

    def free_pages(self: Engine, pages: list[int]) -> None:
        """Return pages from `reserve_pages` that never became a request."""
        self.pool.free(pages)

    def add_prefilled_request(
        self: Engine,
        prompt_token_ids: Sequence[int],
        first_token: int,
        pages: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        logprob: TokenLogprob | None = None,
    ) -> RequestOutput:
        """Admit a request whose prompt KV is already in `pages` (from `reserve_pages`) and whose first
        token was sampled elsewhere; it joins the decode batch when a seat is free. The pages belong
        to the request from here on (freed when it ends, also on error)."""
        try:
            req = self._new_request(prompt_token_ids, params, request_id)
            if len(pages) < self.pool.pages_for(len(prompt_token_ids)):
                raise InvalidRequestError(
                    f"{len(pages)} pages cannot hold a {len(prompt_token_ids)}-token prompt"
                )
        except InvalidRequestError:
            self.pool.free(pages)
            raise
        req.pages = pages
        self._requests[req.request_id] = req
        return self._arrive(req, first_token, logprob)

    def release(self: Engine, request_id: str) -> bool:
        """Free the pages a finished request kept for its KV listener."""
        req = self._held.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.drop_pages(req)  # through the prefix cache: its computed pages stay cached
        return True

    def strand(self: Engine, request_id: str) -> int:
        """Take a request's pages out of use for good (a remote writer may still reach them).

        Returns how many; the request itself can then be aborted as usual. They show as used pages.
        """
        req = self._requests.get(request_id)
        if req is None:
            return 0
        pages, req.pages = req.pages, []
        self._stranded.extend(pages)
        return len(pages)

    @property
    def num_held(self: Engine) -> int:
        """Finished requests whose pages await `release`."""
        return len(self._held)

    def _arrive(self: Engine, req: Request, first_token: int, logprob: TokenLogprob | None) -> RequestOutput:
        req.num_computed = len(req.prompt_ids)
        req.append(first_token, logprob)
        reason = self._stop_reason(req, first_token)
        if reason is not None:
            del self._requests[req.request_id]
            return self._finish(req, reason, [first_token])
        self.scheduler.add_ready(req)
        return self._output(req, [first_token])
