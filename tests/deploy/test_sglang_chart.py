"""The chart's SGLang workers, checked with SGLang's own code (the pinned release, on CPU): every
command line a profile renders for an `engine: sglang` pool, leader and follower pods, goes through
SGLang's argument parser and start-up resolution (`tests.doubles.sglang_cpu.check`), and the expert
placement `moeserve eplb plan --format sglang` writes goes through SGLang's placement loader.

Two host facts cannot be checked here and are substituted as the pods would see them: the device
(`--device=cuda`, what SGLang detects on the GPU nodes) and the RDMA NICs (SGLang reads
/sys/class/infiniband at start-up; `--disaggregation-ib-device` is compared with the profile instead).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.eplb.cli import main as eplb_main
from tests.deploy.test_helm import CHART, pools, render

ROOT = Path(__file__).resolve().parents[2]
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
}  # fmt: skip
QWEN3_235B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
    "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 94,
    "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "torch_dtype": "bfloat16",
    "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False, "hidden_act": "silu",
}  # fmt: skip
SGLANG = {"prefill.engine=sglang", "decode.engine=sglang"}
PROFILES = {
    "values-deepseek-v3-sglang.yaml": (DEEPSEEK_V3, ()),
    "values-deepseek-v3.yaml": (DEEPSEEK_V3, tuple(SGLANG)),
    "values-qwen3-235b.yaml": (QWEN3_235B, tuple(SGLANG)),
}
LEADER = "ms-{role}-0.ms-{role}"


def templates(lws: dict) -> dict[str, dict]:
    """{"leader": pod template, "follower": pod template (groups of more than one pod)}."""
    spec = lws["spec"]["leaderWorkerTemplate"]
    if "leaderTemplate" not in spec:
        return {"leader": spec["workerTemplate"]}
    return {"leader": spec["leaderTemplate"], "follower": spec["workerTemplate"]}


def container(template: dict) -> dict:
    return template["spec"]["containers"][0]


def as_on_the_pod(command: list[str], role: str, index: int, model_dir: Path) -> list[str]:
    """SGLang's arguments as the pod runs them (LWS's variables set), with the host facts this machine
    lacks substituted (see the module's doc)."""
    assert command[:3] == ["python3", "-m", "sglang.launch_server"], command
    out = []
    for arg in command[3:]:
        arg = arg.replace("$(LWS_WORKER_INDEX)", str(index)).replace(
            "$(LWS_LEADER_ADDRESS)", LEADER.format(role=role)
        )
        if arg.startswith("--model-path="):
            arg = f"--model-path={model_dir}"
        if not arg.startswith("--disaggregation-ib-device="):
            out.append(arg)
    return [*out, "--device=cuda"]


def sglang_check(request: dict) -> dict:
    """Ask SGLang's own code (`tests.doubles.sglang_cpu.check`, a process of its own)."""
    r = subprocess.run(
        [sys.executable, "-m", "tests.doubles.sglang_cpu.check"], input=json.dumps(request),
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for name, config in (("deepseek-v3", DEEPSEEK_V3), ("qwen3-235b", QWEN3_235B)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def rendered(models) -> list[dict]:
    """Every SGLang pod of every profile: its profile, role, part, pool values and command."""
    out = []
    for profile, (config, sets) in PROFILES.items():
        model_dir = models["deepseek-v3" if config is DEEPSEEK_V3 else "qwen3-235b"]
        for role, lws in pools(render(profile, sets=sets)).items():
            for part, template in templates(lws).items():
                command = container(template)["command"]
                index = 0 if part == "leader" else 1
                out.append({
                    "profile": profile, "role": role, "part": part, "lws": lws, "template": template,
                    "command": command, "args": as_on_the_pod(command, role, index, model_dir),
                    "nodes": lws["spec"]["leaderWorkerTemplate"]["size"],
                })  # fmt: skip
    return out


@pytest.fixture(scope="module")
def resolved(rendered) -> list[dict]:
    answer = sglang_check({"commands": [r["args"] for r in rendered]})["commands"]
    return [{**r, "sglang": a} for r, a in zip(rendered, answer, strict=True)]


def test_every_rendered_sglang_command_parses_and_resolves_with_sglang_s_own_code(resolved):
    assert {r["profile"] for r in resolved} == set(PROFILES)
    for r in resolved:
        facts, where = r["sglang"], f"{r['profile']} {r['role']} {r['part']}"
        assert "error" not in facts, (where, facts)
        ep = int(next(a for a in r["command"] if a.startswith("--tp-size=")).split("=")[1])
        # Attention DP over the whole group, DeepEP spanning it: EP = TP = attention-DP ranks.
        assert (facts["tp_size"], facts["attn_dp_size"], facts["dp_size"], facts["ep_size"]) == (
            ep,
            ep,
            1,
            ep,
        ), where
        assert facts["disaggregation_mode"] == r["role"] and facts["moe_a2a_backend"] == "deepep", where
        assert facts["disaggregation_transfer_backend"] == "mooncake" and facts["enable_metrics"] is True, (
            where
        )
        assert (facts["nnodes"], facts["node_rank"]) == (r["nodes"], 0 if r["part"] == "leader" else 1), where
        assert facts["dist_timeout"] == 1800, where  # 18 pods start unevenly: not SGLang's default
        if r["nodes"] > 1:
            assert facts["dist_init_addr"] == f"{LEADER.format(role=r['role'])}:29500", where
        if r["role"] == "prefill":
            # The servicer deals requests to the attention-DP ranks itself: the prefill registers
            # each room's rank (round_robin) instead of refusing rooms that point elsewhere.
            assert facts["load_balance_method"] == "round_robin", where
            # SGLang's server args are frozen before the servicer could turn KV events on itself:
            # the prefill names its publisher, one port per DP rank from kvEventsPort.
            events = json.loads(facts["kv_events_config"])
            assert events == {"publisher": "zmq", "endpoint": "tcp://*:5557"}, where
        else:
            assert facts["kv_events_config"] is None, where


def test_only_the_leader_of_a_group_runs_the_grpc_front(resolved):
    multi = [r for r in resolved if r["nodes"] > 1]
    assert {r["part"] for r in multi} == {"leader", "follower"}
    for r in resolved:
        leads = r["part"] == "leader"
        assert r["sglang"]["smg_grpc_mode"] is leads, (r["profile"], r["role"], r["part"])
        assert ("--grpc-mode" in r["command"]) is leads


def test_the_deepseek_v3_sglang_profile_has_deepseek_s_shape(resolved):
    mine = {(r["role"], r["part"]): r for r in resolved if r["profile"] == "values-deepseek-v3-sglang.yaml"}
    prefill, decode = mine[("prefill", "leader")], mine[("decode", "leader")]
    assert (prefill["nodes"], prefill["sglang"]["tp_size"], prefill["sglang"]["deepep_mode"]) == (
        4,
        32,
        "normal",
    )
    assert (decode["nodes"], decode["sglang"]["tp_size"], decode["sglang"]["deepep_mode"]) == (
        18,
        144,
        "low_latency",
    )
    # 256 routed + 32 redundant experts = 288 slots, 2 per GPU: passed without EPLB enabled.
    assert decode["sglang"]["ep_num_redundant_experts"] == 32 and decode["sglang"]["enable_eplb"] is False
    assert (256 + 32) % 144 == 0 and prefill["sglang"]["ep_num_redundant_experts"] == 0
    for r in mine.values():
        nics = [a for a in r["command"] if a.startswith("--disaggregation-ib-device=")]
        assert nics == [f"--disaggregation-ib-device={','.join(f'mlx5_{i}' for i in range(8))}"]
        limits = container(r["template"])["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 8 and limits["rdma/ib"] == 8


def test_sglang_pods_expose_their_metrics_where_sglang_serves_them_and_are_scraped(rendered):
    for r in rendered:
        ports = {p["name"]: p["containerPort"] for p in container(r["template"])["ports"]}
        grpc_port = ports["grpc"]
        # gRPC mode: the HTTP sidecar on --port + 1; another node: its health server on --port.
        assert ports["metrics"] == (grpc_port + 1 if r["part"] == "leader" else grpc_port)
    sets = ("serviceMonitor.enabled=true", "networkPolicy.enabled=false")
    monitors = [o for o in render("values-deepseek-v3-sglang.yaml", sets=sets) if o["kind"] == "PodMonitor"]
    sglang = [
        m for m in monitors if m["spec"]["selector"]["matchLabels"].get("moeserve.io/engine") == "sglang"
    ]
    assert len(sglang) == 1 and sglang[0]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert "leaderworkerset.sigs.k8s.io/worker-index" not in sglang[0]["spec"]["selector"]["matchLabels"]


def test_the_sglang_image_is_the_release_the_conformance_tests_pin(rendered):
    reqs = (ROOT / "tests" / "doubles" / "sglang_cpu" / "requirements.txt").read_text()
    version = re.search(r"^sglang==(\S+)$", reqs, re.M).group(1)
    for r in rendered:
        assert container(r["template"])["image"] == f"lmsysorg/sglang:v{version}"
    values = (CHART / "values.yaml").read_text()
    assert "sglang:latest" not in values


def test_eplb_plan_writes_a_placement_sglang_loads_for_deepseek_v3(models, tmp_path, capsys):
    """61 rows (dense layers included) x 288 slots, loaded by SGLang's ExpertLocationMetadata for the
    profile's EP144 decode; moeserve's own format, one row per MoE layer, is refused by it."""
    gen = torch.Generator().manual_seed(0)
    loads = tmp_path / "loads.json"
    tokens = (torch.rand(58, 256, generator=gen) ** 4 * 1000).round().int().tolist()
    loads.write_text(json.dumps({
        "format": "moeserve-expert-load/1", "num_experts": 256, "top_k": 8, "ep_size": 144, "num_slots": 288,
        "window_tokens": 1, "window_steps": 1, "tokens_per_expert": tokens,
    }))  # fmt: skip
    ours, theirs = tmp_path / "placement.json", tmp_path / "sglang.json"
    common = ["plan", "--loads", str(loads), "--slots", "288", "--gpus", "144", "--nodes", "18"]
    assert eplb_main([*common, "-o", str(ours)]) == 0
    assert (
        eplb_main([*common, "--format", "sglang", "--model", str(models["deepseek-v3"]), "-o", str(theirs)])
        == 0
    )
    assert "SGLang's format, 61 decoder layers" in capsys.readouterr().out
    rows = json.loads(theirs.read_text())["physical_to_logical_map"]
    assert json.loads(ours.read_text())["phy2log"] == rows[3:]  # MoE layers 3..60, in order
    assert eplb_main([*common, "--format", "sglang", "-o", str(tmp_path / "x.json")]) == 2  # needs --model

    lws = pools(render("values-deepseek-v3-sglang.yaml", sets=("decode.eplb.placementConfigMap=eplb",)))[
        "decode"
    ]
    leader = templates(lws)["leader"]
    command = container(leader)["command"]
    assert "--init-expert-location=/etc/moeserve/eplb/placement.json" in command
    mounts = {m["name"]: m["mountPath"] for m in container(leader)["volumeMounts"]}
    volumes = {v["name"]: v for v in leader["spec"]["volumes"]}
    assert mounts["eplb"] == "/etc/moeserve/eplb" and volumes["eplb"]["configMap"]["name"] == "eplb"
    args = as_on_the_pod(command, "decode", 0, models["deepseek-v3"])
    placed = [
        a.replace("/etc/moeserve/eplb/placement.json", str(path)) for path in (theirs, ours) for a in args
    ]
    n = len(args)
    answer = sglang_check({"expert_location": [placed[:n], placed[n:]]})["expert_location"]
    assert answer[0] == {
        "physical_to_logical_map": [61, 288],
        "num_local_physical_experts": 2,
        "first_row": rows[-1],
    }, answer[0]
    assert "error" in answer[1]
