"""Pools that resize under load on the `local` backend: eight clients stream without a pause while
decode goes 1 -> 2 -> 1 and prefill 1 -> 2 -> 1; nothing fails, every answer is the greedy one,
and every new instance serves requests while it exists. And a rank killed under load costs only
its instance: its requests move to the other one."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.load import MAX_TOKENS, PROMPTS, Clients, admin, live, local_orchestrator, wait_for
from tests.oracle import encode, greedy


@pytest.fixture(scope="module")
def local_pools(ds_dir):
    with local_orchestrator(ds_dir) as (c, url):
        yield c, url


def resize(url: str, role: str, count: int) -> None:
    admin(url, "POST", f"/pools/{role}/scale", json={"count": count})


def test_pools_resize_under_load_without_losing_a_request(local_pools, ds_dir):
    _, url = local_pools
    clients = Clients(url, 8)
    try:
        for role in ("decode", "prefill"):
            (first,) = live(url, role)
            resize(url, role, 2)
            new = wait_for(
                lambda role=role, first=first: next(
                    (i for i in live(url, role) if i["id"] != first["id"] and i["served"] >= 3), None
                ),
                120,
                f"a second {role} instance serving requests",
            )
            assert new["state"] == "ready"
            resize(url, role, 1)
            wait_for(
                lambda role=role: len(live(url, role)) == 1 and live(url, role)[0]["state"] == "ready",
                120,
                f"the {role} pool back at one instance",
            )
            pools = admin(url, "GET", "/pools")
            assert pools[role]["desired"] == 1 and pools[role]["ready"] == 1
    finally:
        clients.join()
    assert not clients.failures, clients.failures[:3]
    assert len(clients.answers) >= 16, len(clients.answers)
    expected = {p: greedy(ds_dir, encode(ds_dir, p), MAX_TOKENS) for p in PROMPTS}
    for prompt, text, reason in clients.answers:
        assert (text, reason) == expected[prompt], prompt


@pytest.fixture(scope="module")
def ep2_decodes(ds_dir):
    """One prefill instance and two EP2 decode instances on the local backend."""
    with local_orchestrator(ds_dir, "--decode-instances", "2", "--decode-ep", "2") as (c, url):
        wait_for(
            lambda: len([i for i in live(url, "decode") if i["state"] == "ready"]) == 2, 120, "two decodes"
        )
        yield c, url


def victim_balance(url: str, inst_id: str) -> float | None:
    return next((i["balancedness"] for i in live(url, "decode") if i["id"] == inst_id), None)


def test_a_killed_rank_costs_only_its_instance(ep2_decodes, ds_dir):
    _, url = ep2_decodes
    clients = Clients(url, 6)
    try:
        victim = wait_for(
            lambda: next((i for i in live(url, "decode") if i["inflight"] > 0 and i["served"] >= 2), None),
            60,
            "a busy decode instance",
        )
        # An EP2 instance that routed tokens reports how evenly its two ranks' experts were loaded.
        balance = wait_for(lambda: victim_balance(url, victim["id"]), 10, "an expert-load balancedness")
        assert 0.5 <= balance <= 1.0
        children = Path(f"/proc/{victim['pid']}/task/{victim['pid']}/children").read_text().split()
        ranks = [int(p) for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(ranks) == 2  # the EP2 group's rank processes under the worker
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()

        def victim_out() -> bool:
            me = next((i for i in live(url, "decode") if i["id"] == victim["id"]), None)
            return me is None or me["state"] == "failed"

        wait_for(victim_out, 10, "the instance to be failed")
        assert time.monotonic() - killed < 3.0
        answered_before = len(clients.answers)
        wait_for(
            lambda: len(clients.answers) >= answered_before + 12, 60, "requests served after the failure"
        )
        failures_after = len(clients.failures)
        # The backend replaces it: two ready decode instances again, the victim among neither.
        wait_for(
            lambda: (
                len([i for i in live(url, "decode") if i["state"] == "ready" and i["id"] != victim["id"]])
                == 2
            ),
            120,
            "the decode pool back at two instances",
        )
    finally:
        clients.join()
    assert not any(t.is_alive() for t in clients.threads), "a client hung"
    # The requests that were on the victim moved to the other decode (retried before their first
    # token, migrated after it): no client saw an error, before or after the failure.
    assert not clients.failures and failures_after == 0, clients.failures[:3]
    moved = [ln for ln in httpx.get(f"{url}/metrics", timeout=5).text.splitlines()
             if ln.startswith(("moeserve_migrations_total", "moeserve_retries_total"))]  # fmt: skip
    assert sum(float(ln.split()[-1]) for ln in moved) >= 1
    expected = {p: greedy(ds_dir, encode(ds_dir, p), MAX_TOKENS) for p in PROMPTS}
    assert all((t, r) == expected[p] for p, t, r in clients.answers)
    # Nothing leaked on the instances that lived on.
    wait_for(
        lambda: all(
            i["kv_used_tokens"] == 0 and i["running"] == 0 for i in admin(url, "GET", "/instances")["data"]
        ),
        30,
        "every surviving instance idle with no KV in use",
    )
