"""The `kubernetes` membership backend with the official client against tests/doubles/kube_api.py
(the one sanctioned double: no API server runs here)."""

from __future__ import annotations

import asyncio
import time

import httpx
from kubernetes import client

from orchestrator.config import ApiConfig
from orchestrator.fleet.membership import create
from orchestrator.fleet.registry import Registry, State
from orchestrator.http.app import create_app
from tests.doubles.kube_api import KubeApiDouble

NS, RELEASE = "serving", "ms"


def api_client(url: str) -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = url
    return client.ApiClient(cfg)


async def until(check, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_discovery_scaling_a_pod_never_ready_and_a_dropped_watch():
    double = KubeApiDouble(NS, RELEASE, [f"127.0.0.{i}" for i in range(20, 40)])
    double.add_lws("prefill", 1)
    double.add_lws("decode", 2)
    registry = Registry()
    backend = create(
        "kubernetes", registry, release=RELEASE, namespace=NS, port=30001,
        api_client=api_client(double.url), ready_timeout_s=1.5,
    )  # fmt: skip

    async def main() -> None:
        await backend.start()
        try:
            # Discovery: one instance per group, at its leader pod's IP, starting until healthy.
            assert {(i.role, i.address) for i in registry.all} == {
                ("prefill", "127.0.0.20:30001"),
                ("decode", "127.0.0.21:30001"),
                ("decode", "127.0.0.22:30001"),
            }
            assert backend.desired() == {"prefill": 1, "decode": 2}
            # Nothing answers at those IPs: the groups never turn healthy, so they are failed.
            await until(
                lambda: all(i.state == State.FAILED for i in registry.all), 10, "never-ready groups failed"
            )
            assert "not healthy within" in registry.all[0].reason

            # Scale up: the set's scale is patched; the new group's leader appears through the watch.
            await backend.scale("decode", 3)
            assert double.replicas[f"{RELEASE}-decode"] == 3
            await until(lambda: len(registry.decode) == 3, 10, "the third decode group")
            assert "ms-decode-2" in registry.instances

            # Scale down: the groups that go (the highest indices) drain before the patch.
            await backend.scale("decode", 1)
            assert double.replicas[f"{RELEASE}-decode"] == 1
            await until(lambda: [i.id for i in registry.decode] == ["ms-decode-0"], 10, "decode back at one")

            # A watch that drops is resumed; changes made meanwhile still arrive.
            started = backend.watches_started
            double.drop_watches()
            double.set_replicas(f"{RELEASE}-prefill", 2)
            await until(
                lambda: len(registry.prefill) == 2, 15, "the prefill group added while the watch was down"
            )
            assert backend.watches_started > started
        finally:
            await backend.stop()
            await registry.stop()

    try:
        asyncio.run(main())
    finally:
        double.close()
    # Only the calls the backend documents (and its RBAC allows) were made.
    kinds = {(c.split(" ")[0], c.endswith("/scale"), c.endswith(" watch")) for c in double.calls}
    assert kinds == {
        ("GET", True, False),
        ("PATCH", True, False),
        ("GET", False, False),
        ("GET", False, True),
    }


def test_the_backend_survives_its_api_server(ds_dir):
    """Issue 26: a scale without `replicas`, leaders recreated under their names (with and without
    the events), a half-open watch, a 410 Gone and failing lists; `/ready` says when the watch is
    dead, and recovers."""
    double = KubeApiDouble(NS, RELEASE, [f"127.0.0.{i}" for i in range(40, 60)])
    double.add_lws("prefill", 0)  # the scale's JSON has no `replicas` at all
    double.add_lws("decode", 2)
    registry = Registry()
    backend = create(
        "kubernetes", registry, release=RELEASE, namespace=NS, port={"prefill": 30002, "decode": 30001},
        api_client=api_client(double.url), watch_timeout_s=1.0, stale_after_s=1.0,
    )  # fmt: skip
    config = ApiConfig(ds_dir, "tiny", frozenset())

    def address(name: str) -> str | None:
        inst = registry.instances.get(name)
        return None if inst is None else inst.address

    async def main() -> None:
        await backend.start()
        app = create_app(config, registry, backend)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        try:
            assert backend.desired() == {"prefill": 0, "decode": 2}
            assert address("ms-decode-0") == "127.0.0.40:30001"

            # A leader recreated under its name, with the watch up: the new IP replaces the old.
            ip = double.recreate("ms-decode-0")
            await until(lambda: address("ms-decode-0") == f"{ip}:30001", 10, "the recreated leader's IP")
            # ... and with the events lost in a watch outage: the next list finds it.
            ip = double.recreate("ms-decode-1", announce=False)
            double.drop_watches()
            await until(lambda: address("ms-decode-1") == f"{ip}:30001", 10, "the silently recreated leader")
            assert len(registry.decode) == 2

            # A half-open watch (opens, then silence past its timeout): the client gives up and lists.
            double.hang_watches = True
            double.drop_watches()
            await asyncio.sleep(0.5)
            double.set_replicas(f"{RELEASE}-prefill", 1)  # per-role ports: prefill on 30002
            double.hang_watches = False
            await until(
                lambda: address("ms-prefill-0") is not None, 15, "the prefill group past a silent watch"
            )
            assert address("ms-prefill-0").endswith(":30002") and backend.desired()["prefill"] == 1

            # 410 Gone: list again and resume.
            double.gone_once = True
            double.drop_watches()
            double.set_replicas(f"{RELEASE}-decode", 3)
            await until(lambda: len(registry.decode) == 3, 10, "the decode group past a 410")
            assert backend.desired()["decode"] == 3  # the sets' scales are read again with the list

            # The API server stops answering: once the watch has failed past stale_after_s, /ready
            # says so; when lists work again, it is ready as before.
            ready = (await http.get("/ready")).json()["status"]
            double.fail_lists = 1000
            double.hang_watches = True
            double.drop_watches()
            await until(lambda: backend.problem() is not None, 15, "a stale watch")
            r = await http.get("/ready")
            assert r.status_code == 503 and "pod watch has failed" in r.json()["status"], r.json()
            double.fail_lists, double.hang_watches = 0, False
            await until(lambda: backend.problem() is None, 40, "the watch back")
            assert (await http.get("/ready")).json()["status"] == ready
        finally:
            await http.aclose()
            await backend.stop()
            await registry.stop()

    try:
        asyncio.run(main())
    finally:
        double.close()
