"""Dual dispatch (SGLang workers, `serve --dispatch dual`), as SMG sends a disaggregated request: the
same GenerateRequest to prefill (pinned to the DP rank the policy chose) and to decode. The client
reads decode's stream; prefill's call is read to its end in the background, and a failure of it
before decode's first message ends the attempt at once. The lease ends when the prefill call has
ended, since the prefill worker may still be sending KV until then."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from orchestrator.dispatch import background
from orchestrator.dispatch.failures import RETRYABLE, BeforeFirstToken
from orchestrator.dispatch.router import Lease
from orchestrator.errors import upstream_error
from orchestrator.events import TokenEvent


class Dual:
    """One attempt's two calls."""

    skips_ahead = False
    tail_in_complete = False

    def __init__(self, lease: Lease, request: pb.GenerateRequest):
        self.lease, self.request = lease, request
        self._prefill_call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse] | None = None
        self._decode_call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse] | None = None
        self.rival: asyncio.Future[grpc.aio.AioRpcError | None] | None = None
        """The prefill call read to its end: its error, or None."""

    def open(self, timeout: float) -> AsyncIterator[pb.GenerateResponse]:
        lease = self.lease
        pinned = _pinned(self.request, lease.prefill_rank)
        self._prefill_call = lease.prefill.stub.Generate(pinned, timeout=timeout)
        self._decode_call = lease.decode.stub.Generate(self.request, timeout=timeout)
        self.rival = background.keep(asyncio.ensure_future(_drain(self._prefill_call)))
        return self._decode_call.__aiter__()

    def rival_first(self, error: grpc.aio.AioRpcError | None) -> TokenEvent | None:
        """The prefill call ended before decode's first message; a failure ends the attempt."""
        if error is None:
            return None
        prefill = self.lease.prefill
        api_error = upstream_error("prefill", prefill.address, error.code(), error.details())
        if error.code() in RETRYABLE:
            raise BeforeFirstToken(prefill, api_error)
        raise api_error

    def decode_answered(self) -> None:
        """Decode's first message came."""

    def close(self, finished: bool) -> None:
        if not finished:
            for call in (self._prefill_call, self._decode_call):
                if call is not None:
                    call.cancel()
        if self.rival is None:
            self.lease.release()
        else:
            self.rival.add_done_callback(lambda _: self.lease.release())


def _pinned(request: pb.GenerateRequest, rank: int | None) -> pb.GenerateRequest:
    """The request for prefill: pinned to the DP rank whose cache holds the prefix, if one was chosen
    (decode picks its own rank)."""
    if rank is None:
        return request
    pinned = pb.GenerateRequest()
    pinned.CopyFrom(request)
    pinned.data_parallel_rank = rank
    return pinned


async def _drain(
    call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse],
) -> grpc.aio.AioRpcError | None:
    """Read the prefill call to its end; its error, if it failed (cancellation is no failure)."""
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        return None if e.code() == grpc.StatusCode.CANCELLED else e
    except asyncio.CancelledError:
        pass
    return None
