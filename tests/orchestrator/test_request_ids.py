"""The request-id middleware on its own: ids in flight are unique, and log records carry the id."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import httpx
from starlette.responses import PlainTextResponse

from orchestrator.http.guard import RequestIds
from services.common.logs import REQUEST_ID, JsonFormatter, _WithRequestId


def test_an_id_in_flight_is_refused_until_its_request_ends():
    release = asyncio.Event()
    seen: list[str | None] = []

    async def slow(scope, receive, send):
        seen.append(REQUEST_ID.get())
        await release.wait()
        await PlainTextResponse("done")(scope, receive, send)

    async def scenario():
        transport = httpx.ASGITransport(app=RequestIds(slow))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = asyncio.ensure_future(client.get("/v1/x", headers={"x-request-id": "dup"}))
            while not seen:
                await asyncio.sleep(0.01)
            second = await client.get("/v1/x", headers={"x-request-id": "dup"})
            release.set()
            done = await first
            again = await client.get("/v1/x", headers={"x-request-id": "dup"})
            other = await client.get("/health")
            return second, done, again, other

    second, done, again, other = asyncio.run(scenario())
    assert second.status_code == 409 and "already in flight" in second.json()["error"]["message"]
    assert second.headers["x-request-id"] == "dup"
    assert done.status_code == 200 and done.headers["x-request-id"] == "dup" and seen[0] == "dup"
    assert again.status_code == 200  # free again once the first ended
    assert "x-request-id" not in other.headers  # only /v1/ requests get ids


def test_json_records_carry_the_request_id_of_their_context():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_WithRequestId())
    log = logging.getLogger("test.request_ids")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        token = REQUEST_ID.set("abc")
        log.info("inside %d", 1, extra={"fields": {"tokens": 3}})
        REQUEST_ID.reset(token)
        log.warning("outside")
    finally:
        log.removeHandler(handler)
    inside, outside = (json.loads(line) for line in out.getvalue().splitlines())
    assert inside["request_id"] == "abc" and inside["message"] == "inside 1" and inside["tokens"] == 3
    assert inside["level"] == "info" and inside["logger"] == "test.request_ids"
    assert "request_id" not in outside and outside["level"] == "warning"
