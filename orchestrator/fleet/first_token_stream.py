"""First tokens straight from prefill (decode-first, moeserve workers; `kv_handoff.proto`).

This router keeps one FirstTokens stream per prefill instance that serves decode-first, opened
when its health check finds it ready (and on a request, if it ended since). A request that names
the router's feed gets its first token on it as soon as the prefill rank has sampled it, while its
KV is still on the way to decode: the client has it one worker hop and one KV transfer sooner.
Decode sends the token too; the attempt passes on whichever comes first and drops the other by its
position. Tokens are matched by bootstrap room, which is new for every attempt, so a late token of
a failed attempt never reaches the next one. A stream that ends costs only that head start (decode
delivers every token); it is opened again after a pause.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import grpc

from services.proto.moeserve.v1 import kv_handoff_pb2 as kvpb
from services.proto.moeserve.v1 import kv_handoff_pb2_grpc as kvpb_grpc

log = logging.getLogger(__name__)

FEED_ID = uuid.uuid4().hex
"""This router process's feed on every prefill instance."""
REOPEN_S = 1.0
"""Pause before a stream that ended is opened again."""


class FirstTokenFeed:
    """The FirstTokens stream of one prefill instance, and the rooms waiting for a token on it."""

    def __init__(self, channel: Callable[[], grpc.aio.Channel]):
        self._channel = channel
        self._waiting: dict[int, asyncio.Future[kvpb.FirstToken]] = {}
        self._task: asyncio.Task[None] | None = None
        self._reopen_at = 0.0
        self.live = False
        """The prefill has confirmed the subscription (its first, empty batch came)."""
        self.closed = False
        self.received = 0
        """Tokens that came on the stream (whether or not they were first to the client)."""

    def open(self) -> bool:
        """Open the stream unless it is open, pausing after it ended, or closed; whether it is live."""
        if self._task is None and not self.closed and time.monotonic() >= self._reopen_at:
            self._task = asyncio.get_running_loop().create_task(self._read())
        return self.live

    def expect(self, room: int) -> asyncio.Future[kvpb.FirstToken] | None:
        """A future for the first token of the attempt in `room`; None unless the stream is live (the
        request then does not name the feed). `forget` it when the attempt ends."""
        if not self.open():
            return None
        future = self._waiting[room] = asyncio.get_running_loop().create_future()
        return future

    def forget(self, room: int) -> None:
        self._waiting.pop(room, None)

    async def close(self) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _read(self) -> None:
        # the stub class grpc_tools generates is unannotated
        stub = kvpb_grpc.KVHandoffStub(self._channel())  # type: ignore[no-untyped-call]
        try:
            async for batch in stub.FirstTokens(kvpb.FirstTokensRequest(feed=FEED_ID)):
                self.live = True  # the first batch, empty, says the prefill has subscribed us
                self.received += len(batch.tokens)
                for token in batch.tokens:
                    future = self._waiting.pop(token.room, None)
                    if future is not None and not future.done():
                        future.set_result(token)
        except grpc.aio.AioRpcError as e:  # decode still delivers every token: only the head start is lost
            log.debug("first-token stream ended: %s %s", e.code().name, e.details())
        finally:
            self._task, self._reopen_at, self.live = None, time.monotonic() + REOPEN_S, False
