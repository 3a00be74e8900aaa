"""The routes and their wiring, called in-process (no server, no workers: the pool has none healthy)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from orchestrator.config import ApiConfig
from orchestrator.fleet.membership import create as create_membership
from orchestrator.fleet.registry import Registry
from orchestrator.http.app import create_app

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def app(ds_dir):
    config = ApiConfig(ds_dir, "tiny", frozenset({KEY}), max_concurrency=1, max_queue=0, max_body_bytes=4096)
    registry = Registry()
    return create_app(
        config,
        registry,
        create_membership("static", registry, prefill=["127.0.0.1:1"], decode=["127.0.0.1:2"]),
    )


def call(app, method: str, path: str, **kw) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(main())


def test_v1_needs_the_key_but_health_does_not(app):
    r = call(app, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert call(app, "GET", "/health").json() == {"status": "ok"}


def test_models_lists_the_served_model(app):
    r = call(app, "GET", "/v1/models", headers=AUTH)
    assert [m["id"] for m in r.json()["data"]] == ["tiny"]


def test_large_bodies_are_refused_before_reading(app):
    r = call(app, "POST", "/v1/completions", headers=AUTH, content=b"x" * 5000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize(
    "path, body, status, fragment",
    [
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        (
            "/v1/chat/completions",
            b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "does not exist",
        ),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        (
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": null}]}',
            400,
            "needs content",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
            b'"tools": [{"type": "function", "function": {"name": "f"}}]}',
            400,
            "tools is not supported",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
            b'"response_format": {"type": "json_object"}}',
            400,
            "response_format is not supported",
        ),
        (
            "/v1/completions",
            b'{"model": "tiny", "prompt": "x", "logprobs": 2, "echo": true}',
            400,
            "drop echo or logprobs",
        ),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "logprobs": 21}', 400, "logprobs"),
        (
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
            400,
            "top_logprobs needs logprobs: true",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
            b'"logprobs": true, "top_logprobs": 21}',
            400,
            "top_logprobs",
        ),
    ],
)
def test_bad_requests_get_openai_errors(app, path, body, status, fragment):
    r = call(app, "POST", path, headers=AUTH, content=body)
    assert r.status_code == status and fragment in r.json()["error"]["message"]


def test_no_healthy_worker_is_a_503_and_the_slot_comes_back(app):
    for _ in range(2):  # with one slot, a leaked one would make the second call a 429
        r = call(app, "POST", "/v1/chat/completions", headers=AUTH, json=CHAT)
        assert r.status_code == 503 and "no ready decode instance" in r.json()["error"]["message"]
    assert app.state.admission.in_flight == 0


def test_a_full_server_answers_429(app):
    slot = app.state.admission.admit()
    r = call(app, "POST", "/v1/chat/completions", headers=AUTH, json=CHAT)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    slot.release()


def test_a_stopping_server_answers_503_and_is_not_ready(app):
    app.state.admission.close()
    r = call(app, "POST", "/v1/chat/completions", headers=AUTH, json={**CHAT, "stream": True})
    assert r.status_code == 503
    assert r.json()["error"] == {
        "message": "the server is shutting down; retry the request",
        "type": "service_unavailable",
        "param": None,
        "code": "server_shutting_down",
    }
    ready = call(app, "GET", "/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "shutting down"


def test_a_chunked_body_over_the_limit_is_refused_while_reading(app):
    """No Content-Length: the limit holds as the body streams in, not after buffering it whole."""
    read = 0

    async def body():
        nonlocal read
        for _ in range(1000):  # 1000 x 1 KiB, far over the 4 KiB limit
            read += 1
            yield b"x" * 1024

    r = call(app, "POST", "/v1/completions", headers=AUTH, content=body())
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert read < 50, f"{read} KiB were read before the 413"


@pytest.mark.parametrize(
    "body, fragment",
    [
        ('{"model": "tiny", "prompt": "a\\ud800b"}', "lone surrogate"),
        ('{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}', "lone surrogate"),
        ('{"model": "tiny", "prompt": [1, -5]}', "token ids"),
        ('{"model": "tiny", "prompt": [1, 4294967296]}', "token ids"),
        ('{"model": "tiny", "prompt": [1, 100000]}', "token ids"),
    ],
)
def test_bad_text_and_token_ids_are_400s_not_500s(app, body, fragment):
    r = call(
        app,
        "POST",
        "/v1/completions" if "prompt" in body else "/v1/chat/completions",
        headers=AUTH,
        content=body,
    )
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def queued_app(ds_dir, queue: int, timeout: float):
    config = ApiConfig(
        ds_dir, "tiny", frozenset({KEY}), max_concurrency=1, max_queue=queue, queue_timeout_s=timeout
    )
    registry = Registry()
    membership = create_membership("static", registry, prefill=["127.0.0.1:1"], decode=["127.0.0.1:2"])
    return create_app(config, registry, membership)


def test_a_burst_waits_in_the_bounded_queue_then_gets_429_with_retry_after(ds_dir):
    app = queued_app(ds_dir, queue=1, timeout=0.3)
    slot = app.state.admission.admit()  # the one place is taken

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            post = lambda: client.post("/v1/chat/completions", headers=AUTH, json=CHAT)  # noqa: E731
            start = asyncio.get_running_loop().time()
            waiting, over = await asyncio.gather(post(), post())  # one waits, one finds the queue full
            return waiting, over, asyncio.get_running_loop().time() - start

    waiting, over, took = asyncio.run(burst())
    statuses = sorted([waiting.status_code, over.status_code])
    assert statuses == [429, 429] and all(r.headers["retry-after"] == "1" for r in (waiting, over))
    messages = " | ".join(r.json()["error"]["message"] for r in (waiting, over))
    assert "wait queue (1) is full" in messages and "did not free up within 0.3s" in messages
    assert 0.3 <= took < 5  # nothing hangs
    slot.release()
    assert app.state.admission.in_flight == 0


def test_a_queued_request_goes_in_when_a_place_frees_up(ds_dir):
    app = queued_app(ds_dir, queue=4, timeout=5.0)
    slot = app.state.admission.admit()

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            request = asyncio.ensure_future(client.post("/v1/chat/completions", headers=AUTH, json=CHAT))
            await asyncio.sleep(0.2)
            assert not request.done()  # waiting for the place
            slot.release()
            return await request

    r = asyncio.run(main())
    # Admitted: it got past the queue to the router (no workers here: 503), not a 429.
    assert r.status_code == 503 and "no ready decode instance" in r.json()["error"]["message"]
    assert app.state.admission.in_flight == 0
