"""What a real GPU cluster needs of the chart (issue 26), checked on the rendered objects: probes
sized for loading a 671B model, the ranks' timeouts, expert slots, RDMA security, gang-scheduling
knobs, a NetworkPolicy, authenticated monitoring, generated keys and the capacity it holds."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest

from tests.deploy.test_helm import CHART, args_of, orchestrator_args, pools, render, run_helm, validate

DS = "values-deepseek-v3.yaml"
DS_SGLANG = "values-deepseek-v3-sglang.yaml"
MONITORED = (
    "serviceMonitor.enabled=true",
    "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
)


def part(lws: dict, name: str) -> dict | None:
    """The pod spec of a LeaderWorkerSet's leaderTemplate or workerTemplate."""
    template = lws["spec"]["leaderWorkerTemplate"].get(name)
    return None if template is None else template["spec"]


def worker(spec: dict) -> dict:
    return next(c for c in spec["containers"] if c["name"] == "worker")


def test_a_group_s_leader_is_probed_for_a_long_start_and_its_followers_are_not():
    lws = pools(render(DS, sets=("probes.startupSeconds=5400",)))["decode"]
    leader, follower = worker(part(lws, "leaderTemplate")), worker(part(lws, "workerTemplate"))
    # moeserve workers bind their port before loading: every probe asks HealthCheck (every rank of
    # the group answers it only once loaded), through the image's client, told the role and port.
    check = {"exec": {"command": ["python3", "/opt/moeserve/healthcheck.py"]}, "periodSeconds": 10}
    check["timeoutSeconds"] = 10
    assert leader["startupProbe"] == {**check, "failureThreshold": 540}
    assert leader["livenessProbe"] == {**check, "failureThreshold": 6}
    assert leader["readinessProbe"] == check
    env = {e["name"]: e.get("value") for e in leader["env"]}
    assert (env["MOESERVE_ROLE"], env["MOESERVE_PORT"]) == ("decode", "30001")
    assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(follower)
    # SGLang's servicer runs the standard gRPC health service; a one-pod group's only pod leads.
    sglang = worker(part(pools(render(DS_SGLANG))["prefill"], "leaderTemplate"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sglang[probe]["grpc"] == {"port": 30001}
    single = worker(part(pools(render())["prefill"], "workerTemplate"))
    assert single["startupProbe"]["failureThreshold"] == 360 and "readinessProbe" in single


def test_the_ranks_wait_long_enough_for_every_node_and_slots_divide_by_the_ep_width():
    lws = pools(render(DS))
    for role in ("prefill", "decode"):
        assert "--dist-timeout=1800" in args_of(lws[role])
    # DeepSeek-V3 decode at EP144: 256 experts + 32 redundant = 288 slots, 2 per GPU.
    assert "--ep-slots=288" in args_of(lws["decode"])
    assert not any(a.startswith("--ep-slots") for a in args_of(lws["prefill"]))
    r = run_helm(
        "template", "ms", str(CHART), "-f", str(CHART / DS), "--set", "decode.eplb.redundantExperts=0"
    )
    assert r.returncode != 0 and "256 slots do not divide by ep 144" in r.stderr, r.stderr
    sglang = pools(render(DS_SGLANG))["decode"]
    assert "--dist-timeout=1800" in args_of(sglang) and "--ep-num-redundant-experts=32" in args_of(sglang)


def test_gpu_workers_run_as_rdma_needs_and_nothing_else_gets_privileges():
    objs = render(DS)
    for lws in pools(objs).values():
        for name in ("leaderTemplate", "workerTemplate"):
            ctx = worker(part(lws, name))["securityContext"]
            assert ctx["runAsUser"] == 0 and ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK", "SYS_RESOURCE"]}
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    tiny = worker(part(pools(render("values-cpu-tiny.yaml"))["decode"], "workerTemplate"))["securityContext"]
    assert tiny["runAsNonRoot"] is True and tiny["capabilities"] == {"drop": ["ALL"]}
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"]
    orchestrator = deploy["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert (
        orchestrator["capabilities"] == {"drop": ["ALL"]}
        and orchestrator["allowPrivilegeEscalation"] is False
    )
    custom = render(sets=("decode.securityContext.privileged=true",))
    assert worker(part(pools(custom)["decode"], "workerTemplate"))["securityContext"] == {"privileged": True}


def test_rdma_networking_and_gang_scheduling_knobs_reach_every_pod_and_validate():
    sets = (
        "decode.hostNetwork=true", "decode.infiniband=true", "networkPolicy.nodeCIDRs[0]=10.0.0.0/16",
        "decode.podAnnotations.k8s\\.v1\\.cni\\.cncf\\.io/networks=rdma-net",
        "decode.schedulerName=volcano", "decode.priorityClassName=serving-high",
        "decode.exclusiveTopology=topology.kubernetes.io/rack", "decode.subGroupSize=2",
        "decode.extraVolumes[0].name=cache", "decode.extraVolumes[0].emptyDir.medium=Memory",
        "decode.extraVolumeMounts[0].name=cache", "decode.extraVolumeMounts[0].mountPath=/cache",
        "decode.extraContainers[0].name=sidecar", "decode.extraContainers[0].image=busybox:1.36",
    )  # fmt: skip
    objs = render(DS, sets=sets)
    lws = pools(objs)["decode"]
    validate(lws)
    meta = lws["metadata"]["annotations"]
    assert meta == {"leaderworkerset.sigs.k8s.io/exclusive-topology": "topology.kubernetes.io/rack"}
    assert lws["spec"]["leaderWorkerTemplate"]["subGroupPolicy"] == {"subGroupSize": 2}
    for name in ("leaderTemplate", "workerTemplate"):
        template = lws["spec"]["leaderWorkerTemplate"][name]
        spec = template["spec"]
        assert template["metadata"]["annotations"] == {"k8s.v1.cni.cncf.io/networks": "rdma-net"}
        assert (spec["hostNetwork"], spec["dnsPolicy"]) == (True, "ClusterFirstWithHostNet")
        assert (spec["schedulerName"], spec["priorityClassName"]) == ("volcano", "serving-high")
        assert {"name": "infiniband", "hostPath": {"path": "/dev/infiniband", "type": "Directory"}} in spec[
            "volumes"
        ]
        assert {"name": "cache", "emptyDir": {"medium": "Memory"}} in spec["volumes"]
        mounts = {m["name"]: m["mountPath"] for m in worker(spec)["volumeMounts"]}
        assert (mounts["infiniband"], mounts["cache"]) == ("/dev/infiniband", "/cache")
        assert [c["name"] for c in spec["containers"]] == ["worker", "sidecar"]
        # Without a device plugin only a privileged container may open the host's uverbs devices.
        assert worker(spec)["securityContext"] == {"runAsUser": 0, "privileged": True}
    prefill = part(pools(objs)["prefill"], "leaderTemplate")
    assert "hostNetwork" not in prefill and "schedulerName" not in prefill  # per pool


def test_a_digest_pins_what_every_moeserve_pod_pulls():
    digest = "sha256:" + "ab" * 32
    objs = render(sets=(f"image.digest={digest}",))
    images = {c["image"] for o in objs for c in _containers(o)}
    assert images == {f"ghcr.io/moeserve/moeserve@{digest}"}
    r = run_helm("template", "ms", str(CHART), "--set", "image.digest=latest")
    assert r.returncode != 0 and "/image/digest" in r.stderr


def _containers(obj: dict) -> list[dict]:
    if obj["kind"] == "LeaderWorkerSet":
        return [
            c
            for t in ("leaderTemplate", "workerTemplate")
            for c in (part(obj, t) or {"containers": []})["containers"]
        ]
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["spec"]["containers"]
    if obj["kind"] == "Pod":
        return obj["spec"]["containers"]
    return []


def test_worker_ports_are_fenced_to_the_release_and_the_api_is_open():
    objs = render(sets=("networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",))
    policies = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    workers, api = policies["ms-workers"], policies["ms-orchestrator"]
    assert workers["podSelector"]["matchExpressions"] == [
        {"key": "moeserve.io/role", "operator": "In", "values": ["prefill", "decode"]}
    ]
    assert workers["policyTypes"] == ["Ingress"]
    assert workers["ingress"][0] == {
        "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "ms"}}}]
    }
    assert workers["ingress"][1] == {
        "from": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        "ports": [{"port": "metrics"}],
    }
    assert api["ingress"] == [{"ports": [{"port": "http"}]}]
    assert not [o for o in render(sets=("networkPolicy.enabled=false",)) if o["kind"] == "NetworkPolicy"]
    # A pool on the host network connects from node addresses: they must be named, and are admitted.
    r = run_helm("template", "ms", str(CHART), "--set", "decode.hostNetwork=true")
    assert r.returncode != 0 and "set networkPolicy.nodeCIDRs" in r.stderr, r.stderr
    objs = render(sets=("decode.hostNetwork=true", "networkPolicy.nodeCIDRs[0]=10.0.0.0/16"))
    (workers,) = [o["spec"] for o in objs if o["metadata"]["name"] == "ms-workers"]
    assert workers["ingress"][0]["from"][1] == {"ipBlock": {"cidr": "10.0.0.0/16"}}
    # Monitors the policy would leave timing out are refused until it admits Prometheus.
    r = run_helm("template", "ms", str(CHART), "--set", "serviceMonitor.enabled=true")
    assert r.returncode != 0 and "set networkPolicy.metricsFrom" in r.stderr, r.stderr


def test_keys_are_generated_unless_named_and_prometheus_scrapes_with_the_admin_token():
    objs = render(sets=(*MONITORED, "serviceMonitor.labels.release=kube-prometheus-stack"))
    (secret,) = [o for o in objs if o["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "ms-keys"
    assert secret["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    keys = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert len(keys["api-keys"]) == 40 and len(keys["admin-token"]) == 48 and keys["api-keys"].isalnum()
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"]
    env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env == {
        "MOESERVE_API_KEYS": {"name": "ms-keys", "key": "api-keys"},
        "MOESERVE_ADMIN_TOKEN": {"name": "ms-keys", "key": "admin-token"},
        "MOESERVE_GRPC_TOKEN": {"name": "ms-keys", "key": "grpc-token", "optional": True},
    }
    assert len(keys["grpc-token"]) == 48
    # moeserve workers get the same gRPC token (and their readiness probe sends it); SGLang's don't
    # check one, and have none.
    for lws in pools(objs).values():
        spec = part(lws, "workerTemplate")
        worker_env = {e["name"]: e.get("valueFrom") for e in worker(spec)["env"]}
        assert worker_env["MOESERVE_GRPC_TOKEN"] == {"secretKeyRef": env["MOESERVE_GRPC_TOKEN"]}
    sglang = worker(part(pools(render(DS_SGLANG))["decode"], "leaderTemplate"))
    assert "MOESERVE_GRPC_TOKEN" not in {e["name"] for e in sglang["env"]}
    monitors = {o["metadata"]["name"]: o for o in objs if o["kind"] in ("ServiceMonitor", "PodMonitor")}
    assert all(m["metadata"]["labels"]["release"] == "kube-prometheus-stack" for m in monitors.values())
    (endpoint,) = monitors["ms"]["spec"]["endpoints"]
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "ms-keys", "key": "admin-token"},
    }
    named = render(sets=("orchestrator.secretName=mine",))
    assert not [o for o in named if o["kind"] == "Secret"]
    (deploy,) = [o for o in named if o["kind"] == "Deployment"]
    assert {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    } == {"mine"}


def test_the_test_pod_pulls_with_the_release_s_secrets_and_sends_the_key():
    objs = render(sets=("imagePullSecrets[0].name=regcred",))
    (pod,) = [o for o in objs if o["kind"] == "Pod"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["KEY"]["valueFrom"]["secretKeyRef"] == {"name": "ms-keys", "key": "api-keys"}


@pytest.mark.parametrize(
    "profile, holds",
    [(DS, "208 GPUs on 26 node(s)"), ("values-cpu-tiny.yaml", "4 CPU ranks on 2 node(s)")],
)
def test_the_notes_say_what_the_release_holds_and_what_one_more_group_needs(profile, holds):
    r = run_helm(
        "install", "ms", str(CHART), "-f", str(CHART / profile), "--dry-run", "--namespace", "serving"
    )
    assert r.returncode == 0, r.stderr
    notes = r.stdout.split("NOTES:", 1)[1]
    assert f"this release holds {holds}" in notes
    assert "--wait --timeout 5400" in notes


def test_serve_gets_per_role_ports_from_the_chart():
    args = orchestrator_args(render(DS))
    assert "--prefill-worker-port=30001" in args and "--decode-worker-port=30001" in args


def init_of(spec: dict) -> dict:
    (init,) = spec["initContainers"]
    return init


def test_an_hf_model_is_downloaded_once_per_volume_and_the_orchestrator_takes_its_tokenizer(tmp_path):
    sets = ("model.source=hf://deepseek-ai/DeepSeek-V3@e815299", "model.hfTokenSecret=hf")
    objs = render(DS, sets=sets)
    spec = part(pools(objs)["decode"], "leaderTemplate")
    init = init_of(spec)
    assert init["command"][:2] == ["python3", "-c"]
    assert init["command"][3:] == ["deepseek-ai/DeepSeek-V3", "e815299", "/models/DeepSeek-V3", "0", "0"]
    assert init["env"] == [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    ]
    # A root-owned volume: the download runs as root with only what writing takes, then hands the
    # files to the worker's user (root on GPUs, 10001 on CPUs and for the orchestrator).
    assert init["securityContext"]["runAsUser"] == 0
    caps = init["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"]}
    cpu = part(pools(render("values-cpu-tiny.yaml", sets=(sets[0],)))["decode"], "workerTemplate")
    assert init_of(cpu)["command"][-1] == "10001"
    sglang = part(pools(render(DS_SGLANG, sets=sets))["decode"], "leaderTemplate")
    assert init_of(sglang)["image"] == "lmsysorg/sglang:v0.5.23"  # no moeserve image on SGLang pools
    volume = next(v for v in spec["volumes"] if v["name"] == "models")
    assert volume == {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": False}}
    assert "--model=/models/DeepSeek-V3" in args_of(pools(objs)["decode"])
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    assert init_of(pod)["command"][3:] == [
        "deepseek-ai/DeepSeek-V3", "e815299", "/models/DeepSeek-V3", "1", "10001"
    ]  # fmt: skip
    assert next(v for v in pod["volumes"] if v["name"] == "models") == {"name": "models", "emptyDir": {}}
    assert "--model=/models/DeepSeek-V3" in pod["containers"][0]["command"]
    # The script itself, against a stand-in for huggingface_hub that records what it is asked.
    hub = tmp_path / "hub"
    (hub / "huggingface_hub").mkdir(parents=True)
    (hub / "huggingface_hub" / "__init__.py").write_text(
        "import json, os\n"
        "def snapshot_download(repo, revision=None, local_dir=None, allow_patterns=None):\n"
        "    with open(os.environ['CALLS'], 'a') as f:\n"
        "        f.write(json.dumps([repo, revision, local_dir, allow_patterns]) + '\\n')\n"
    )
    calls, dest = tmp_path / "calls.jsonl", tmp_path / "models" / "DeepSeek-V3"
    env = {"PYTHONPATH": str(hub), "CALLS": str(calls), "PATH": "/usr/bin:/bin"}

    def run(command: list[str]) -> None:
        command = [sys.executable, *command[1:3], *command[3:5], str(dest), command[6], str(os.getuid())]
        r = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    for _ in range(2):  # the second pod on the volume finds it complete
        run(init["command"])
    run(init_of(pod)["command"])
    got = [json.loads(line) for line in calls.read_text().splitlines()]
    assert got[0] == ["deepseek-ai/DeepSeek-V3", "e815299", str(dest), None] and len(got) == 2
    assert got[1][3] is not None and "*.json" in got[1][3]  # the tokenizer and config files only


def test_a_pvc_source_mounts_that_claim_read_only_and_a_bad_source_is_refused():
    objs = render(sets=("model.source=pvc://weights/ds/v3",))
    spec = part(pools(objs)["prefill"], "workerTemplate")
    assert "initContainers" not in spec
    volume = next(v for v in spec["volumes"] if v["name"] == "models")
    assert volume["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    assert "--model=/models/ds/v3" in args_of(pools(objs)["prefill"])
    for bad in ("hf://no-org", "s3://bucket/model", "tiny://llama"):
        r = run_helm("template", "ms", str(CHART), "--set", f"model.source={bad}")
        assert r.returncode != 0 and "/model/source" in r.stderr, (bad, r.stderr)


def test_the_cpu_profile_builds_its_tiny_model_in_every_pod_with_the_cpu_image(tmp_path):
    objs = render("values-cpu-tiny.yaml")
    spec = part(pools(objs)["decode"], "workerTemplate")
    init = init_of(spec)
    assert init["command"] == [
        "moeserve",
        "make-tiny-model",
        "/models/tiny-deepseek_v3",
        "--arch",
        "deepseek_v3",
    ]
    assert init["image"].endswith("-cpu") and worker(spec)["image"] == init["image"]
    assert next(v for v in spec["volumes"] if v["name"] == "models") == {"name": "models", "emptyDir": {}}
    assert "--model=/models/tiny-deepseek_v3" in args_of(pools(objs)["decode"])
    # The command the init container runs makes a model the worker can load.
    out = tmp_path / "tiny-deepseek_v3"
    cmd = [sys.executable, "-m", "orchestrator.cli", *init["command"][1:2], str(out), *init["command"][3:]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
