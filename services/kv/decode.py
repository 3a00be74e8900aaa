"""Decode side of the KV hand-off on one rank: the scheduler reserves, prefill writes, decode runs.

A disaggregated request enters the engine WAITING_FOR_KV with a `RemotePrefill` as its KV source.
When the scheduler has reserved its pages (pool room, at most `max_num_seqs` in transfer), the
source attaches them to the room on the prefill instance (decode-first: with the request itself,
which prefill then needs from no one else); the Attach answers once prefill has
written the prompt's KV, with the first token, and the request joins the running batch when a
seat is free. Failures end the request's stream with a `CallError`; pages are freed only
once no write can land any more (prefill answered, or a Release returned).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

from services.common.calls import CallError
from services.engine import RequestOutput, SamplingParams
from services.engine.loop import EngineLoop, RequestStream
from services.kv.layout import KVLayout
from services.kv.pages import KVRegion
from services.kv.rooms import AttachResult, AttachSpec

log = logging.getLogger(__name__)

RELEASE_TRIES = 3
"""Releases tried before a room's pages are given up as stranded (never reused, counted)."""


@dataclass(frozen=True)
class Forward:
    """Decode-first: the request to hand prefill in the Attach, and the prefill DP rank to run it on."""

    request: bytes
    """The router's GenerateRequest, serialized (prefill reads it as if it had been sent there)."""
    prefill_rank: int | None = None
    token_feed: str = ""
    """The router's FirstTokens feed on the prefill instance, for the first token as it is sampled."""


class AttachClient(Protocol):
    """Reaches the KV hand-off service of prefill instances (gRPC in the worker)."""

    def attach(
        self,
        prefill: str,
        spec: AttachSpec,
        timeout: float,
        on_done: Callable[[AttachResult | CallError], None],
    ) -> Callable[[], object]:
        """Start an Attach; `on_done` gets the result or the error. Returns a cancel function."""

    def release(self, prefill: str, room: int, reason: str) -> bool:
        """Give up on a room: True once prefill confirms no write can land any more (or is gone)."""


class RemotePrefill:
    """The KV source of one disaggregated request (callbacks from the engine and the client)."""

    def __init__(
        self,
        side: DecodeHandoff,
        request_id: str,
        room: int,
        prefill: str,
        prompt: list[int],
        stream: RequestStream,
        forward: Forward | None = None,
    ):
        self.side, self.request_id, self.room, self.prefill = side, request_id, room, prefill
        self.prompt, self.stream, self.forward = prompt, stream, forward
        self.result: AttachResult | None = None
        self._cancel: Callable[[], object] | None = None  # what it returns is not used
        self.cancelled = False

    def on_pages(self, request_id: str, pages: list[int]) -> None:
        try:
            self._attach(request_id, pages)
        except Exception as e:  # never into the engine's step: fail this request alone
            self.side.loop.call(self.side.fail, request_id, CallError("INTERNAL", f"cannot attach: {e!r}"))

    def _attach(self, request_id: str, pages: list[int]) -> None:
        side = self.side
        spec = AttachSpec(
            room=self.room,
            request_id=request_id,
            layout=side.layout,
            transfer_session=side.transfer_session,
            kv_base=side.region.base,
            layer_stride=side.region.layer_stride,
            page_ids=tuple(pages),
            num_prompt_tokens=len(self.prompt),
            forwarded=self.forward.request if self.forward else b"",
            prefill_rank=self.forward.prefill_rank if self.forward else None,
            token_feed=self.forward.token_feed if self.forward else "",
        )
        self._cancel = side.client.attach(self.prefill, spec, side.prefill_timeout_s, self._done)

    def cancel(self) -> bool:
        """Stop waiting for the KV (engine thread); the request fails once the room is released."""
        if self._cancel is None or self.cancelled:
            return False
        self.cancelled = True
        self._cancel()
        return True

    def _done(self, outcome: AttachResult | CallError) -> None:
        if isinstance(outcome, AttachResult):
            self.result = outcome
            try:
                if not self.cancelled:  # the first token goes out now, not after the step running meanwhile
                    lps = [outcome.first_logprob] if outcome.first_logprob is not None else []
                    first = [outcome.first_token_id]
                    out = RequestOutput(
                        self.request_id, self.prompt, first, None, first, outcome.cached_tokens, lps
                    )
                    self.stream.put(out)
            finally:  # whatever happened above, the engine takes the request on (or frees it)
                self.side.loop.call(self._arrived, outcome)
        else:
            self.side.settle.submit(self._failed, outcome)

    def _arrived(self, res: AttachResult) -> None:
        loop = self.side.loop
        self.side.attaching.pop(self.request_id, None)
        out = loop.engine.handoff.kv_arrived(self.request_id, res.first_token_id, res.first_logprob)
        if out is None:
            return
        if out.finished:  # its token went out when the KV arrived (`_done`)
            loop.deliver(replace(out, new_token_ids=[]))
        if self.cancelled:  # aborted just as the KV arrived: prefill is done, the pages are free to go
            loop.abort(self.request_id)

    def _failed(self, err: CallError) -> None:
        side = self.side
        # Whatever ended the Attach, prefill may still be writing into the pages (its rank may not
        # have heard yet): free them only once it confirms no write can land, or is gone.
        reason = "aborted" if self.cancelled else err.code.lower()
        settled = any(side.client.release(self.prefill, self.room, reason) for _ in range(RELEASE_TRIES))
        if self.cancelled:
            err = CallError("ABORTED", f"request {self.request_id} aborted while waiting for KV")
        else:  # the Attach failed: prefill's failure (or the way to it) unless prefill says it was ours
            err = CallError(
                err.code,
                f"KV hand-off from prefill {self.prefill} (room {self.room}) failed: {err.message}",
                peer="" if err.peer == "decode" else "prefill",
            )

        side.loop.call(side.fail, self.request_id, err, settled)


class DecodeHandoff:
    """Disaggregated requests of one decode rank, from WAITING_FOR_KV to the running batch."""

    def __init__(
        self,
        loop: EngineLoop,
        layout: KVLayout,
        region: KVRegion,
        transfer_session: str,
        client: AttachClient,
        handoff_timeout_s: float,
        prefill_timeout_s: float,
    ):
        self.loop, self.layout, self.region = loop, layout, region
        self.transfer_session, self.client = transfer_session, client
        self.handoff_timeout_s, self.prefill_timeout_s = handoff_timeout_s, prefill_timeout_s
        self.attaching: dict[str, RemotePrefill] = {}
        """Requests whose KV source exists, by request id (engine thread)."""
        self.stranded_pages = 0
        """Pages given up because no prefill confirmed that its writes into them had stopped."""
        self.settle = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kv-release")
        """Releases rooms that ended badly (a blocking call to prefill) off the client's threads."""

    def start(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        room: int,
        prefill: str,
        stream: RequestStream,
        forward: Forward | None = None,
    ) -> RemotePrefill:
        """Queue the request WAITING_FOR_KV (engine thread); its outputs go to `stream`. With
        `forward`, the Attach carries the request to prefill (decode-first)."""
        source = RemotePrefill(self, request_id, room, prefill, prompt, stream, forward)
        rid = self.loop.engine.handoff.add_remote_request(prompt, params, request_id, source)
        self.attaching[rid] = source
        self.loop.attach_stream(rid, stream)
        self.loop.call_later(self.handoff_timeout_s, lambda: self._expire(rid, len(prompt)))
        return source

    def abort(self, request_id: str) -> bool:
        """Abort a request (engine thread): one whose KV is in flight is released first."""
        source = self.attaching.get(request_id)
        if source is not None and (source.cancelled or source.cancel()):
            return True  # the source releases the room, then fails the request: never free here
        self.attaching.pop(request_id, None)
        return self.loop.abort(request_id)

    def fail(self, request_id: str, error: CallError, settled: bool = True) -> None:
        """End a request with `error` (engine thread); its pages are freed only if `settled`."""
        self.attaching.pop(request_id, None)
        if not settled:
            self.stranded_pages += self.loop.engine.handoff.strand(request_id)
            log.error(
                "request %s: prefill did not confirm its KV writes stopped; pages kept out of use", request_id
            )
        self.loop.fail(request_id, error)

    def queue_depths(self) -> dict[str, int]:
        sched = self.loop.engine.scheduler
        return {
            "decode_prealloc": len(sched.kv_waiting),
            "decode_transfer": len(sched.kv_transferring),
            "stranded_pages": self.stranded_pages,
        }

    def _expire(self, request_id: str, prompt_len: int) -> None:
        if self.loop.engine.handoff.awaiting_pages(request_id):
            self.fail(
                request_id,
                CallError(
                    "RESOURCE_EXHAUSTED",
                    f"decode KV pool has no room for a {prompt_len}-token prompt after "
                    f"{self.handoff_timeout_s:.0f}s; retry later or add decode capacity",
                ),
            )
