"""The admin API in-process: who may call it, what it shows, what a static pool refuses."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from orchestrator.config import ApiConfig
from orchestrator.fleet.membership import create as create_membership
from orchestrator.fleet.membership.static import parse_targets
from orchestrator.fleet.registry import Registry, State
from orchestrator.http.app import create_app

KEY, ADMIN = "user-key", "admin-token"


def make_app(ds_dir, admin_token: str = "", public: bool = False):
    config = ApiConfig(ds_dir, "tiny", frozenset({KEY}), admin_token=admin_token, public=public)
    registry = Registry()
    membership = create_membership(
        "static",
        registry,
        prefill=["grpc://10.0.0.1:5000", "8998"],
        decode=["10.0.0.2:6000", "10.0.0.2:6001"],
    )
    asyncio.run(membership.start())
    return create_app(config, registry, membership), registry


def call(app, method: str, path: str, client=("127.0.0.1", 1234), **kw) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.request(method, path, **kw)

    return asyncio.run(main())


def test_with_a_token_only_the_token_opens_it(ds_dir):
    app, _ = make_app(ds_dir, ADMIN)
    for headers, status in (
        ({}, 401),
        ({"Authorization": "Bearer nope"}, 401),
        ({"Authorization": f"Bearer {KEY}"}, 403),  # an API key is not an admin token
        ({"Authorization": f"Bearer {ADMIN}"}, 200),
    ):
        r = call(app, "GET", "/admin/pools", headers=headers, client=("10.9.9.9", 1))
        assert r.status_code == status, (headers, r.text)
        if status != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    # ...and the admin token is no API key.
    r = call(app, "GET", "/v1/models", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 401


def test_without_a_token_only_loopback_clients_get_in(ds_dir):
    app, _ = make_app(ds_dir)
    assert call(app, "GET", "/admin/pools").status_code == 200
    assert call(app, "GET", "/admin/pools", client=("::1", 1)).status_code == 200
    r = call(app, "GET", "/admin/pools", client=("192.168.1.5", 1))
    assert r.status_code == 403 and "--admin-token" in r.json()["error"]["message"]


def test_pools_and_instances_show_the_registry(ds_dir):
    app, registry = make_app(ds_dir)
    registry.decode[0].state = State.READY
    pools = call(app, "GET", "/admin/pools").json()
    assert pools["membership"] == "static"
    assert pools["prefill"]["desired"] == 1 and pools["decode"]["desired"] == 2
    assert pools["decode"]["ready"] == 1 and pools["decode"]["states"]["starting"] == 1
    data = call(app, "GET", "/admin/instances").json()["data"]
    prefill = next(i for i in data if i["role"] == "prefill")
    assert prefill["address"] == "10.0.0.1:5000" and prefill["bootstrap"] == "10.0.0.1:8998"
    assert {i["state"] for i in data} == {"starting", "ready"}


def test_a_static_pool_cannot_scale_and_unknown_names_are_404(ds_dir):
    app, _ = make_app(ds_dir)
    r = call(app, "POST", "/admin/pools/decode/scale", json={"count": 3})
    assert r.status_code == 409 and "cannot scale" in r.json()["error"]["message"]
    assert call(app, "POST", "/admin/pools/chef/scale", json={"count": 1}).status_code == 404
    assert call(app, "POST", "/admin/pools/decode/scale", json={"count": -1}).status_code == 422
    assert call(app, "POST", "/admin/instances/decode-99/drain").status_code == 404


@pytest.mark.parametrize(
    "tokens, error",
    [
        (["8998"], "must follow a grpc://HOST:PORT"),
        (["nohostport"], "is not HOST:PORT"),
        (["h:1", "h:x"], "h:x"),
    ],
)
def test_bad_targets_are_named(tokens, error):
    with pytest.raises(ValueError, match=error):
        parse_targets(tokens)


def test_listening_beyond_loopback_the_admin_api_needs_its_token_even_from_loopback(ds_dir):
    """Issue 26: behind a sidecar proxy (Istio connects from 127.0.0.6) every client looks local,
    so a server on 0.0.0.0 without an admin token answers no admin request; /metrics likewise."""
    app, _ = make_app(ds_dir, public=True)
    for client in (("127.0.0.6", 1234), ("127.0.0.1", 1234)):
        r = call(app, "GET", "/admin/instances", client=client)
        assert r.status_code == 403 and "needs --admin-token" in r.json()["error"]["message"]
    app, _ = make_app(ds_dir, ADMIN, public=True)
    assert (
        call(app, "GET", "/admin/instances", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    )
    app, _ = make_app(ds_dir)  # loopback only: loopback clients are trusted as before
    assert call(app, "GET", "/admin/instances").status_code == 200


def test_serve_knows_which_hosts_are_loopback_only():
    from services.common.process import loopback_only

    assert all(loopback_only(h) for h in ("127.0.0.1", "127.0.0.6", "::1", "localhost"))
    assert not any(loopback_only(h) for h in ("0.0.0.0", "::", "10.0.0.5", "moeserve.example.com"))
