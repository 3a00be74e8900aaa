"""The autoscaler on the `local` backend under a scripted load ramp: a burst scales decode up, a
steady load in between its two thresholds changes nothing, and the pool comes back down once the
load is gone; every decision is explained, and no request fails."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from services.common.process import free_port
from tests.load import Clients, admin, live, local_orchestrator, wait_for

SCALING = "interval=0.5,window=4,min=1,max=2,utilization=0.7,down-utilization=0.4,down-delay=4,cold-start=120"


@pytest.fixture(scope="module")
def autoscaled(ds_dir):
    """Pools of one prefill and one decode instance, two requests at once per instance."""
    with local_orchestrator(ds_dir, "--worker-arg=--max-num-seqs=2", "--autoscale", SCALING) as (c, url):
        yield c, url


def decisions(url: str, role: str | None = None) -> list[dict]:
    return [d for d in admin(url, "GET", "/autoscaler")["decisions"] if role is None or d["role"] == role]


def desired(url: str, role: str) -> int:
    return admin(url, "GET", "/pools")[role]["desired"]


def test_a_load_ramp_scales_up_holds_and_scales_down(autoscaled):
    _, url = autoscaled
    state = admin(url, "GET", "/autoscaler")
    assert state["enabled"] and state["config"]["max"] == 2 and state["capacity_from"] == "instances' reports"
    # burst: six clients against two places per instance
    burst = Clients(url, 6, max_tokens=40)
    try:
        wait_for(lambda: desired(url, "decode") == 2, 60, "the burst to scale decode up")
        (up,) = [d for d in decisions(url, "decode") if d["to"] == 2]
        assert up["from"] == 1 and "in flight" in up["reason"] and "per instance" in up["reason"]
        wait_for(lambda: sum(i["state"] == "ready" for i in live(url, "decode")) == 2, 180, "the new decode")
    finally:
        burst.join()
    # steady: two clients, enough for two instances at 70% but too many for one at 40%
    steady = Clients(url, 2, max_tokens=40)
    try:
        time.sleep(1.0)
        before = decisions(url, "decode")
        time.sleep(8.0)  # twice the down-delay
        assert decisions(url, "decode") == before and desired(url, "decode") == 2
        evaluation = admin(url, "GET", "/autoscaler")["roles"]["decode"]
        assert evaluation["current"] == evaluation["desired"] == 2, evaluation
    finally:
        steady.join()
    # quiet: back to one decode instance after the down-delay, and explained
    wait_for(lambda: desired(url, "decode") == 1, 60, "decode back to one instance")
    down = decisions(url, "decode")[-1]
    assert (down["from"], down["to"]) == (2, 1) and "0 requests in flight" in down["reason"]
    assert burst.answers and steady.answers and not burst.failures and not steady.failures
    moves = [(d["from"], d["to"]) for d in decisions(url, "decode")]
    assert moves == [(1, 2), (2, 1)]  # no flapping


def test_autoscale_settings_and_backends_that_cannot_scale(ds_dir):
    base = [sys.executable, "-m", "orchestrator.serve", "--model", str(ds_dir), "--port", str(free_port())]
    for extra, message in (
        (["--membership", "local", "--autoscale", "max=two"], "is not a number"),
        (["--membership", "local", "--autoscale", "speed=3"], "KEY=VALUE"),
        (
            ["--membership", "local", "--autoscale", "utilization=0.3,down-utilization=0.5"],
            "down-utilization",
        ),
        (["--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2", "--autoscale", "on"], "cannot scale"),
    ):
        run = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and message in run.stderr, run.stderr
