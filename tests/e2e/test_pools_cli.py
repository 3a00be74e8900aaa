"""`moeserve pools` through typer's runner against live orchestrators: a local pool it can scale and
drain, one guarded by an admin token, and one that is not there."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from orchestrator.pools_cli import EXIT_REFUSED, EXIT_TIMEOUT, EXIT_UNAUTHORISED, EXIT_UNREACHABLE, app
from orchestrator.up import wait_http
from services.common.process import free_port
from tests.cluster import LocalCluster

runner = CliRunner()


def orchestrator(c: LocalCluster, ds_dir, *extra: str) -> str:
    port = free_port()
    args = ["-m", "orchestrator.serve", "--model", str(ds_dir), "--port", str(port), "--membership", "local"]
    c.procs[f"orchestrator-{port}"] = c.cluster.spawn("orchestrator", [*args, *extra])
    url = f"http://127.0.0.1:{port}"
    wait_http(c.cluster, f"{url}/ready", 180)
    return url


@pytest.fixture(scope="module")
def live(ds_dir):
    c = LocalCluster()
    try:
        yield orchestrator(c, ds_dir), orchestrator(c, ds_dir, "--admin-token", "s3cret")
    finally:
        c.stop()


def pools(*args: str):
    return runner.invoke(app, list(args))


def test_status_as_a_table_and_as_json(live):
    url, _ = live
    r = pools("status", "--url", url)
    assert r.exit_code == 0, r.output
    for word in ("instance", "prefill-1", "decode-2", "ready", "membership local", "prefill: 1/1 ready"):
        assert word in r.output
    r = pools("status", "--url", url, "--output", "json")
    data = json.loads(r.stdout)
    assert data["pools"]["decode"]["desired"] == 1
    assert {i["role"] for i in data["instances"]} == {"prefill", "decode"}
    # EP1 holds every expert: balanced once it has routed tokens, unknown before.
    assert all(i["state"] == "ready" and i["balancedness"] in (None, 1.0) for i in data["instances"])


def test_scale_waits_until_the_pools_match_then_drain_removes_one(live):
    url, _ = live
    r = pools("scale", "--decode", "2", "--wait", "--timeout", "120", "--url", url, "--output", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["decode"]["ready"] == 2
    decodes = [i for i in json.loads(pools("status", "--url", url, "--output", "json").stdout)["instances"]
               if i["role"] == "decode"]  # fmt: skip
    assert len(decodes) == 2
    r = pools("drain", decodes[0]["id"], "--wait", "--url", url)
    assert r.exit_code == 0 and f"{decodes[0]['id']}: gone" in r.output, r.output
    r = pools("scale", "--decode", "1", "--wait", "--timeout", "60", "--url", url)
    assert r.exit_code == 0, r.output


def test_errors_have_exit_codes_and_messages_not_tracebacks(live):
    url, guarded = live
    cases = [
        (("status", "--url", guarded), EXIT_UNAUTHORISED, "invalid or missing admin token"),
        (("status", "--url", guarded, "--admin-token", "wrong"), EXIT_UNAUTHORISED, "not allowed (401)"),
        (
            ("status", "--url", f"http://127.0.0.1:{free_port()}"),
            EXIT_UNREACHABLE,
            "cannot reach the orchestrator",
        ),
        (("drain", "decode-99", "--url", url), EXIT_REFUSED, "no instance 'decode-99'"),
        (("scale", "--url", url), 2, "say how many"),
        (("scale", "--decode", "-1", "--url", url), 2, ""),
        (
            ("scale", "--prefill", "3", "--wait", "--timeout", "0.1", "--url", url),
            EXIT_TIMEOUT,
            "did not match",
        ),
    ]
    for args, code, message in cases:
        r = pools(*args)
        assert r.exit_code == code, (args, r.output)
        assert message in r.output and "Traceback" not in r.output, (args, r.output)
    assert pools("status", "--url", guarded, "--admin-token", "s3cret").exit_code == 0
    pools("scale", "--prefill", "1", "--wait", "--timeout", "120", "--url", url)
