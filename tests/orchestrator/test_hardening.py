"""Issue 27's findings at the HTTP edge, in-process (no workers): loose types and unbounded numbers
get the client's 400 in OpenAI's shape, never a 500; deep nesting is refused while parsing; a bug
is an OpenAI-shaped 500 with no traceback; `/ready`'s details and the API's pages are the admin's."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from orchestrator import metrics
from orchestrator.config import ApiConfig
from orchestrator.fleet.breaker import Breaker, BreakerState
from orchestrator.fleet.membership import create as create_membership
from orchestrator.fleet.registry import Registry
from orchestrator.http import app as app_module
from orchestrator.http.app import create_app

KEY, ADMIN = "k", "admin"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "tiny", "prompt": "hi"}


def make(ds_dir, **config) -> tuple:
    cfg = ApiConfig(ds_dir, "tiny", frozenset({KEY}), max_body_bytes=1 << 20, **config)
    registry = Registry()
    membership = create_membership("static", registry, prefill=["127.0.0.1:1"], decode=["127.0.0.1:2"])
    asyncio.run(membership.start())  # the instances are known (not ready: nothing answers there)
    return create_app(cfg, registry, membership), registry


@pytest.fixture
def app(ds_dir):
    return make(ds_dir)[0]


def call(app, method: str, path: str, client=("127.0.0.1", 1234), **kw) -> httpx.Response:
    async def main() -> httpx.Response:
        # As a server does: what the app answered, even when it also raised (to the log).
        transport = httpx.ASGITransport(app=app, client=client, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.request(method, path, **kw)

    return asyncio.run(main())


def post_text(app, body: str) -> httpx.Response:
    """A chat completion whose JSON body is written by hand (what `json=` cannot express)."""
    headers = {**AUTH, "content-type": "application/json"}
    return call(app, "POST", "/v1/chat/completions", headers=headers, content=body)


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"], body
    assert "Traceback" not in r.text
    return body


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {**CHAT, "max_tokens": "10"}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": True}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {**CHAT, "temperature": "1"}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "logprobs": 1}, "logprobs"),
        ("/v1/completions", {**COMPLETION, "prompt": [True, False]}, "prompt"),
        ("/v1/completions", {**COMPLETION, "echo": "true"}, "echo"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages",
        ),
    ],
)
def test_loose_types_are_refused_as_openai_refuses_them(app, path, body, param):
    err = openai_error(call(app, "POST", path, headers=AUTH, json=body), 400)
    assert err["type"] == "invalid_request_error" and (err["param"] or "").startswith(param), err


@pytest.mark.parametrize(
    "field, value",
    [
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("top_k", 2**31),
        ("max_tokens", 2**31),
        ("max_completion_tokens", 2**40),
    ],
)
def test_numbers_past_what_the_workers_carry_are_the_client_s_400(app, field, value):
    err = openai_error(
        call(app, "POST", "/v1/chat/completions", headers=AUTH, json={**CHAT, field: value}), 400
    )
    assert err["param"] == field


def test_a_seed_of_401_digits_is_a_400_not_a_traceback(app):
    body = json.dumps(CHAT)[:-1] + ', "seed": ' + "9" * 401 + "}"
    assert openai_error(post_text(app, body), 400)["param"] == "seed"


@pytest.mark.parametrize("depth", [33, 5_000, 100_000])
def test_deep_nesting_is_refused_while_parsing(app, depth):
    body = '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "x": ' + "[" * depth
    body += "]" * depth + "}"
    assert "nested deeper than 32" in openai_error(post_text(app, body), 400)["message"]


def test_a_bug_is_an_openai_shaped_500_without_a_traceback(app, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app_module, "prompt_ids", broken)
    r = call(app, "POST", "/v1/chat/completions", headers=AUTH, json=CHAT)
    err = openai_error(r, 500)
    assert err["type"] == "api_error" and "secret internals" not in r.text


def test_refusals_count_as_rejected_not_as_errors(app):
    def count(outcome: str) -> float:
        return (
            metrics.REGISTRY.get_sample_value(
                "moeserve_requests_total", {"model": "tiny", "outcome": outcome}
            )
            or 0
        )

    before = {o: count(o) for o in ("rejected", "error", "throttled")}
    call(app, "POST", "/v1/chat/completions", headers=AUTH, json={**CHAT, "top_k": 2**31})
    assert count("rejected") == before["rejected"] + 1 and count("error") == before["error"]
    assert [metrics.outcome_of(s) for s in (400, 404, 413, 429, 500, 503)] == [
        "rejected", "rejected", "rejected", "throttled", "error", "error",
    ]  # fmt: skip


def test_ready_details_and_the_api_pages_are_the_admin_s_once_keys_are_set(ds_dir):
    guarded, _ = make(ds_dir, admin_token=ADMIN)
    plain = call(guarded, "GET", "/ready")
    assert plain.status_code == 503 and plain.json() == {"status": "not ready"}  # no worker addresses
    admin = call(guarded, "GET", "/ready", headers={"Authorization": f"Bearer {ADMIN}"})
    assert set(admin.json()["workers"]) == {"127.0.0.1:1", "127.0.0.1:2"}
    for page in ("/docs", "/redoc", "/openapi.json"):
        assert call(guarded, "GET", page).status_code == 404
    # API keys without an admin token: the admin API is loopback-only, and so are the details.
    keys_only, _ = make(ds_dir)
    assert "workers" not in call(keys_only, "GET", "/ready", client=("10.1.2.3", 5)).json()
    assert "workers" in call(keys_only, "GET", "/ready").json()
    assert call(keys_only, "GET", "/openapi.json").status_code == 404
    # Nothing set, on loopback: a developer's server keeps its pages.
    cfg = ApiConfig(ds_dir, "tiny")
    registry = Registry()
    membership = create_membership("static", registry, prefill=["127.0.0.1:1"], decode=["127.0.0.1:2"])
    open_app = create_app(cfg, registry, membership)
    assert call(open_app, "GET", "/openapi.json").status_code == 200


def test_a_breaker_opens_on_distinct_requests_only():
    breaker = Breaker(threshold=3, cooldown_s=60)
    for _ in range(5):  # one request retried (or charging twice): one failure
        breaker.failure("poison")
    assert breaker.state == BreakerState.CLOSED and breaker.failures == 1
    breaker.failure("b")
    assert breaker.state == BreakerState.CLOSED
    breaker.failure("c")
    assert breaker.state == BreakerState.OPEN and breaker.opened == 1
    breaker.success()
    assert breaker.failures == 0 and breaker.state == BreakerState.CLOSED


def test_retries_stay_under_a_breaker_s_threshold():
    from orchestrator.dispatch.generate import MAX_ATTEMPTS
    from orchestrator.fleet.breaker import THRESHOLD

    assert MAX_ATTEMPTS - 1 < THRESHOLD
