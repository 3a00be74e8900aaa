"""The router's end of a prefill's FirstTokens stream, against a FirstTokens server on loopback that
the test feeds: live only once the prefill confirms, tokens matched by room, a stream that ends
reopened after a pause, and none after close."""

from __future__ import annotations

import asyncio

import grpc

from orchestrator.fleet import first_token_stream as first_tokens
from orchestrator.fleet.first_token_stream import FirstTokenFeed
from services.proto.moeserve.v1 import kv_handoff_pb2 as kvpb
from services.proto.moeserve.v1 import kv_handoff_pb2_grpc as kvpb_grpc


class Prefill(kvpb_grpc.KVHandoffServicer):
    """FirstTokens only: the confirming empty batch, then what the test puts (None ends the stream)."""

    def __init__(self) -> None:
        self.batches: asyncio.Queue = asyncio.Queue()
        self.subscriptions: list[str] = []

    async def FirstTokens(self, request, context):
        self.subscriptions.append(request.feed)
        yield kvpb.FirstTokenBatch()
        while (batch := await self.batches.get()) is not None:
            yield batch


def batch(*rooms: int) -> kvpb.FirstTokenBatch:
    return kvpb.FirstTokenBatch(tokens=[kvpb.FirstToken(room=r, token_id=100 + r) for r in rooms])


async def until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)


def test_the_feed_is_live_once_confirmed_matches_rooms_reopens_and_stops_when_closed(monkeypatch):
    monkeypatch.setattr(first_tokens, "REOPEN_S", 0.2)

    async def scenario() -> None:
        prefill = Prefill()
        server = grpc.aio.server()
        kvpb_grpc.add_KVHandoffServicer_to_server(prefill, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        feed = FirstTokenFeed(lambda: channel)
        try:
            assert feed.open() is False and feed.expect(1) is None  # not confirmed yet: name no feed
            await until(lambda: feed.live)
            assert prefill.subscriptions == [first_tokens.FEED_ID]
            mine, gone = feed.expect(5), feed.expect(6)
            feed.forget(6)  # its attempt ended: a late token for it goes nowhere
            await prefill.batches.put(batch(6, 5, 7))
            token = await asyncio.wait_for(mine, 5)
            assert (token.room, token.token_id) == (5, 105) and not gone.done()
            assert feed.received == 3
            await prefill.batches.put(None)  # the prefill ends the stream (restart, drain)
            await until(lambda: not feed.live)
            assert feed.open() is False  # pausing before it opens again
            await asyncio.sleep(0.3)
            feed.open()
            await until(lambda: feed.live)
            assert len(prefill.subscriptions) == 2
            await feed.close()
            assert not feed.live and feed.open() is False and feed.expect(8) is None
            await asyncio.sleep(0.3)
            assert feed.open() is False and len(prefill.subscriptions) == 2  # closed for good
        finally:
            await feed.close()
            await channel.close()
            await server.stop(None)

    asyncio.run(scenario())
