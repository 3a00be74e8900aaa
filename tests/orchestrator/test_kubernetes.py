"""The `kubernetes` membership backend with the official client against tests/doubles/kube_api.py
(the one sanctioned double: no API server runs here)."""

from __future__ import annotations

import asyncio
import time

from kubernetes import client

from orchestrator.fleet.membership import create
from orchestrator.fleet.registry import Registry, State
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
