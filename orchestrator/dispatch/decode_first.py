"""Decode-first dispatch (moeserve workers, `services.common.wire`): the GenerateRequest goes to
decode alone, which forwards it to prefill in its KV Attach, so the router holds one stream per
request, and the last step's tokens come in the GenerateComplete (one message fewer).

Unless the request asks for log-probabilities, it also names this router's FirstTokens feed on the
prefill instance (`fleet.first_token_stream`), if that stream is live: the prefill's first token
then reaches the client ahead of the KV transfer, and decode's copy of it is dropped by position.
Tokens are matched by bootstrap room, new for every attempt, so a late token of a failed attempt
never reaches the next.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from orchestrator import metrics
from orchestrator.dispatch.router import Lease
from orchestrator.events import TokenEvent
from orchestrator.fleet import first_token_stream
from services.common import wire
from services.proto.moeserve.v1 import kv_handoff_pb2 as kvpb


class DecodeFirst:
    """One attempt's single call, and the prefill's first token if it comes ahead."""

    tail_in_complete = True

    def __init__(self, lease: Lease, request: pb.GenerateRequest, ahead: bool):
        self.lease, self.request = lease, request
        self.rival: asyncio.Future[kvpb.FirstToken] | None = (
            lease.prefill.first_tokens.expect(lease.room) if ahead else None
        )
        """The prefill's first token on this router's feed; None: the request does not name the feed."""
        self.skips_ahead = self.rival is not None
        """Decode's stream may repeat a token that went out ahead: drop it by position."""
        self._won = False
        self._call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse] | None = None

    def open(self, timeout: float) -> AsyncIterator[pb.GenerateResponse]:
        feed = first_token_stream.FEED_ID if self.rival is not None else ""
        forward = wire.forward_metadata(self.lease.prefill_rank, feed)
        self._call = self.lease.decode.stub.Generate(self.request, timeout=timeout, metadata=forward)
        return self._call.__aiter__()

    def rival_first(self, token: kvpb.FirstToken | None) -> TokenEvent | None:
        """The prefill's first token came before decode's first message: it goes to the client now."""
        if token is None:
            return None
        self._won = True
        metrics.FIRST_TOKENS.labels("prefill").inc()
        return TokenEvent([token.token_id], None, token.prompt_tokens, 1, token.cached_tokens)

    def decode_answered(self) -> None:
        """Decode's first message came; it brought the first token if the feed's had not."""
        if self.rival is not None and not self._won:
            metrics.FIRST_TOKENS.labels("decode").inc()

    def close(self, finished: bool) -> None:
        if self.rival is not None:
            self.lease.prefill.first_tokens.forget(self.lease.room)
        if not finished and self._call is not None:
            self._call.cancel()
        self.lease.release()
