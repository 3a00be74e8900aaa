"""The Helm chart, checked with the real tools that run offline: Helm (lint, schema, render) and
kubernetes-validate (every object against Kubernetes 1.33's schemas; LeaderWorkerSets against the
vendored CRD schema of LWS v0.10.0, their pod templates as pod templates)."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml

from services.worker.__main__ import app as worker_app
from services.worker.__main__ import build_config
from tests.deploy.tools import helm

CHART = Path(__file__).resolve().parents[2] / "helm" / "moeserve"
PROFILES = [
    "values-deepseek-v3.yaml",
    "values-deepseek-v3-sglang.yaml",
    "values-qwen3-235b.yaml",
    "values-cpu-tiny.yaml",
]
K8S = "1.33"
"""The newest Kubernetes version the chart is validated for..."""
K8S_VERSIONS = ("1.29", "1.30", "1.31", "1.32", K8S)
"""...and every one it supports."""
LWS_SCHEMA = Path(__file__).with_name("lws-v0.10.0.schema.json")
CRD_KINDS = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm()), *args], capture_output=True, text=True, timeout=120)


def render(*values: str, sets: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", "ms", str(CHART), "--namespace", "serving"]
    for v in values:
        args += ["-f", str(CHART / v)]
    for s in sets:
        args += ["--set", s]
    r = run_helm(*args)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def strict(schema):
    """Unknown fields rejected, as the API server's pruning of a structural schema would drop them."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
        if "properties" in out and not open_ended:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(x) for x in schema]
    return schema


LWS_VALIDATOR = jsonschema.Draft7Validator(strict(json.loads(LWS_SCHEMA.read_text())["schema"]))


def validate(obj: dict, version: str = K8S) -> None:
    """Raise if `obj` is not a valid object of a known kind for Kubernetes `version`."""
    key = (obj["apiVersion"], obj["kind"])
    if key == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"):
        errors = sorted(LWS_VALIDATOR.iter_errors(obj), key=str)
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]
        for part in ("leaderTemplate", "workerTemplate"):
            template = obj["spec"]["leaderWorkerTemplate"].get(part)
            if template is not None:
                pod = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": "t"},
                    "template": template,
                }
                kubernetes_validate.validate(pod, version, strict=True)
        return
    if key == ("monitoring.coreos.com/v1", "ServiceMonitor"):
        assert set(obj) == {"apiVersion", "kind", "metadata", "spec"} and obj["spec"]["endpoints"]
        return
    if key == ("monitoring.coreos.com/v1", "PodMonitor"):
        assert set(obj) == {"apiVersion", "kind", "metadata", "spec"} and obj["spec"]["podMetricsEndpoints"]
        return
    # An unknown or removed apiVersion raises SchemaNotFoundError here: a failure, not a warning.
    kubernetes_validate.validate(obj, version, strict=True)


def test_lint_is_strict_and_clean_for_the_defaults_and_every_profile():
    for values in [[], *([p] for p in PROFILES)]:
        args = ["lint", "--strict", str(CHART)] + [x for v in values for x in ("-f", str(CHART / v))]
        r = run_helm(*args)
        assert r.returncode == 0 and "0 chart(s) failed" in r.stdout, (values, r.stdout, r.stderr)


@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_every_rendered_object_validates(profile):
    monitored = (
        "serviceMonitor.enabled=true",
        "networkPolicy.metricsFrom[0].podSelector.matchLabels.app=prometheus",
    )
    objs = render(*([profile] if profile else []), sets=monitored)
    kinds = {(o["apiVersion"], o["kind"]) for o in objs}
    assert ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet") in kinds and ("apps/v1", "Deployment") in kinds
    assert ("networking.k8s.io/v1", "NetworkPolicy") in kinds and ("v1", "Secret") in kinds
    for version in K8S_VERSIONS:
        for obj in objs:
            validate(obj, version)


def test_unknown_and_removed_api_versions_fail_validation():
    pdb = {"kind": "PodDisruptionBudget", "metadata": {"name": "x"}, "spec": {"maxUnavailable": 1}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "policy/v1beta1", **pdb})  # removed in 1.25
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "moeserve.io/v9", "kind": "Thing", "metadata": {"name": "x"}})
    lws = next(o for o in render() if o["kind"] == "LeaderWorkerSet")
    lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Sometimes"
    with pytest.raises(AssertionError, match="restartPolicy"):
        validate(lws)


def test_a_values_file_that_breaks_the_schema_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("decode:\n  replicas: many\n")
    r = run_helm("template", "ms", str(CHART), "-f", str(bad))
    assert r.returncode != 0 and "/decode/replicas" in r.stderr and "want integer" in r.stderr, r.stderr
    r = run_helm("template", "ms", str(CHART), "--set", "prefill.ep=12")
    assert r.returncode != 0 and "prefill.ep (12) must be a multiple of prefill.gpusPerNode (8)" in r.stderr


def pools(objs: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["labels"]["moeserve.io/role"]: o for o in objs if o["kind"] == "LeaderWorkerSet"}


def args_of(lws: dict) -> list[str]:
    return lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["command"]


def test_deepseek_profile_groups_follow_the_ep_arithmetic_and_render_fast():
    start = time.monotonic()
    objs = render("values-deepseek-v3.yaml")
    assert time.monotonic() - start < 2.0
    lws = pools(objs)
    assert lws["prefill"]["spec"]["leaderWorkerTemplate"]["size"] == 4  # EP32 / 8 GPUs
    assert lws["decode"]["spec"]["leaderWorkerTemplate"]["size"] == 18  # EP144 / 8 GPUs
    assert lws["decode"]["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lws["prefill"]["metadata"]["name"] == "ms-prefill"  # what the kubernetes backend scales
    container = lws["decode"]["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    assert (
        container["resources"]["limits"]["nvidia.com/gpu"] == 8
        and container["resources"]["limits"]["rdma/ib"] == 8
    )


def test_sglang_command_lines_carry_what_each_mode_needs():
    """(SGLang's own parser checks them too: tests/deploy/test_sglang_chart.py.)"""
    objs = render("values-deepseek-v3.yaml", sets=("prefill.engine=sglang", "decode.engine=sglang"))
    lws = pools(objs)
    common = {
        "--disaggregation-transfer-backend=mooncake", "--moe-a2a-backend=deepep", "--enable-metrics",
        "--node-rank=$(LWS_WORKER_INDEX)", "--trust-remote-code",
    }  # fmt: skip
    prefill, decode = set(args_of(lws["prefill"])), set(args_of(lws["decode"]))
    assert common <= prefill and common <= decode
    assert {
        "--disaggregation-mode=prefill",
        "--disaggregation-bootstrap-port=8998",
        "--load-balance-method=round_robin",
        "--deepep-mode=normal",
        "--tp-size=32",
        "--attn-dp-size=32",
        "--nnodes=4",
        "--dist-init-addr=$(LWS_LEADER_ADDRESS):29500",
    } <= prefill
    assert {"--disaggregation-mode=decode", "--deepep-mode=auto", "--tp-size=144", "--nnodes=18"} <= decode
    assert not any(a.startswith(("--disaggregation-bootstrap-port", "--load-balance-method")) for a in decode)
    # The gRPC front runs on each group's leader only (followers: args_of reads the worker template).
    assert "--grpc-mode" not in prefill | decode
    for group in lws.values():
        leader = group["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["command"]
        assert "--grpc-mode" in leader and set(leader) - {"--grpc-mode"} == set(args_of(group))
    orchestrator = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert (
        "--bootstrap-port=8998" in orchestrator["command"]
        and "--membership=kubernetes" in orchestrator["command"]
    )


def test_moeserve_command_lines_start_our_workers_with_the_same_topology():
    """The rendered worker arguments parse with `moeserve worker` itself into the expected group."""
    lws = pools(render("values-deepseek-v3.yaml"))
    env = {
        "$(LWS_WORKER_INDEX)": "3",
        "$(LWS_LEADER_ADDRESS)": "ms-decode-0.ms-decode",
        "$(POD_IP)": "10.1.2.3",
    }
    command = typer.main.get_command(worker_app)
    for role, (ep, nodes) in {"prefill": (32, 4), "decode": (144, 18)}.items():
        args = args_of(lws[role])
        assert args[:2] == ["moeserve", "worker"]
        for key, value in env.items():
            args = [a.replace(key, value) for a in args]
        ctx = command.make_context("worker", args[2:])
        config = build_config(
            argparse.Namespace(**{k: getattr(v, "value", v) for k, v in ctx.params.items()})
        )
        assert (config.role, config.ep_size, config.nnodes, config.node_rank) == (role, ep, nodes, 3)
        assert config.dist_init_addr == "ms-decode-0.ms-decode:29500" and config.advertised == "10.1.2.3"
        assert config.dispatcher == "deepep" and config.engine.device == "cuda"
        assert config.transfer_protocol == "rdma" and config.transfer_device.startswith("mlx5_0")
        assert config.metrics_port == 9090


def test_the_pod_monitor_scrapes_the_leaders_metrics_port():
    objs = render(sets=("serviceMonitor.enabled=true", "networkPolicy.enabled=false"))
    (monitor,) = [o for o in objs if o["kind"] == "PodMonitor" and o["metadata"]["name"] == "ms-workers"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector["leaderworkerset.sigs.k8s.io/worker-index"] == "0"  # only leaders serve it
    for lws in pools(objs).values():
        pod = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]
        labels = pod["metadata"]["labels"]
        assert all(labels[k] == v for k, v in selector.items() if not k.startswith("leaderworkerset"))
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 9090 and "--metrics-port=9090" in args_of(lws)
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    off = pools(render(sets=("decode.metricsPort=0",)))["decode"]
    assert not any(a.startswith("--metrics-port") for a in args_of(off))


def orchestrator_args(objs: list[dict]) -> list[str]:
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"]
    return deploy["spec"]["template"]["spec"]["containers"][0]["command"]


def test_the_autoscaler_is_off_unless_set_and_its_setting_reaches_serve():
    assert not any(a.startswith("--autoscale") for a in orchestrator_args(render()))
    spec = "min=1,max=4,cold-start=1200,model=deepseek-v3,gpu=h800,decode-ep=144"
    args = orchestrator_args(render(sets=(f"orchestrator.autoscale={spec.replace(',', chr(92) + ',')}",)))
    assert f"--autoscale={spec}" in args
    r = run_helm("template", "ms", str(CHART), "--set", "orchestrator.autoscale=max")
    assert r.returncode != 0 and "autoscale" in r.stderr


def test_the_orchestrator_role_grants_exactly_what_the_kubernetes_backend_calls():
    """The calls are the ones the backend's test against the API double records
    (tests/orchestrator/test_kubernetes.py): pods list and watch, the pools' scale get and patch."""
    role = next(o for o in render() if o["kind"] == "Role")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): sorted(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("",), ("pods",)): ["list", "watch"],
        (("leaderworkerset.x-k8s.io",), ("leaderworkersets/scale",)): ["get", "patch"],
    }


def test_each_role_s_worker_port_and_the_timeouts_reach_serve():
    args = orchestrator_args(
        render(sets=("prefill.port=31001", "decode.port=32001", "orchestrator.readyTimeoutS=5400"))
    )
    assert "--prefill-worker-port=31001" in args and "--decode-worker-port=32001" in args
    assert "--k8s-ready-timeout=5400" in args and "--k8s-watch-stale=120" in args
    assert not any(a.startswith("--worker-port") for a in args)


@pytest.mark.parametrize(
    "sets, message",
    [
        (("prefill.engine=sglang",), "prefill.engine (sglang) and decode.engine (moeserve) differ"),
        (
            ("orchestrator.autoscale=on", "orchestrator.replicas=2"),
            "orchestrator.autoscale needs orchestrator.replicas: 1",
        ),
    ],
)
def test_what_cannot_work_is_refused_at_render(sets, message):
    args = ["template", "ms", str(CHART)]
    for s in sets:
        args += ["--set", s]
    r = run_helm(*args)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_a_release_name_too_long_for_the_generated_names_is_refused():
    name = "r" * 41
    r = run_helm("template", name, str(CHART))
    assert r.returncode != 0 and "at most 40 fit every generated name" in r.stderr, r.stderr
    objs = render()  # and 40 characters render names that fit
    r = run_helm("template", "r" * 40, str(CHART), "-f", str(CHART / "values-deepseek-v3.yaml"))
    assert r.returncode == 0, r.stderr
    for o in (d for d in yaml.safe_load_all(r.stdout) if d):
        name = o["metadata"]["name"]
        assert len(name) <= 63, name
        if o["kind"] == "LeaderWorkerSet":  # its worker StatefulSet's revision-hash label, group 17
            assert len(f"{name}-17-0123456789") <= 63, name
    assert objs
