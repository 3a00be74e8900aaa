"""Decode's first message against a rival that may end sooner.

Before decode has said anything, one other thing may come first: under decode-first, the prefill's
first token on this router's FirstTokens stream (it then goes to the client at once); under dual
dispatch, the end of the prefill call (a failure then ends the attempt at once). `responses` wraps
decode's stream so that whatever comes first comes out first: the rival's result, once, then
decode's messages in order. After decode's first message the rival is no longer watched.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from smg_grpc_proto import sglang_scheduler_pb2 as pb


@dataclass(frozen=True)
class RivalFirst:
    """The rival ended before decode's first message: its result (or None if it was cancelled)."""

    result: Any


async def responses(
    decode: AsyncIterator[pb.GenerateResponse], rival: asyncio.Future[Any] | None
) -> AsyncGenerator[pb.GenerateResponse | RivalFirst, None]:
    """Decode's messages, preceded by `RivalFirst` if `rival` is done before the first of them."""
    if rival is not None:
        first = asyncio.ensure_future(anext(decode))
        try:
            await asyncio.wait({first, rival}, return_when=asyncio.FIRST_COMPLETED)
            if not first.done():  # the rival is sooner; decode's first message is still read after it
                yield RivalFirst(None if rival.cancelled() else rival.result())
            message = await first
        except StopAsyncIteration:
            return
        finally:
            _settle(first)
        yield message
    async for message in decode:
        yield message


def _settle(read: asyncio.Future[Any]) -> None:
    """A read of decode's stream the caller no longer waits for: stop it, or take its error."""
    if not read.done():
        read.cancel()
    elif not read.cancelled():
        read.exception()
