"""`moeserve plan`: calibrated on the two publications, narrow at low load and wide EP at high load,
its JSON contract, its plot and its errors, run as a user would."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from orchestrator.planner.layout import Traffic
from orchestrator.planner.plan import evaluate, plan
from orchestrator.planner.specs import GPUS, MODELS, from_config, model_spec

MOESERVE = str(Path(sys.executable).with_name("moeserve"))
FIELDS = {"prefill_ep", "decode_ep", "prefill_groups", "decode_groups", "gpus", "input_tokens_per_s_per_node",
          "output_tokens_per_s_per_node", "ttft_ms", "itl_ms", "usd_per_million_output_tokens",
          "decode_batch_per_gpu", "decode_step_ms", "prefill_chunk_per_gpu",
          "prefill_utilization", "input_tokens_per_s_per_gpu", "output_tokens_per_s_per_gpu"}  # fmt: skip


def moeserve_plan(*args: str) -> dict:
    run = subprocess.run(
        [MOESERVE, "plan", *args, "--output", "json"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def within(got: float, published: float, tolerance: float = 0.15) -> bool:
    return abs(got / published - 1) <= tolerance


def test_deepseeks_published_deployment_from_the_command_line():
    """H800, prefill EP32, decode EP144, 56.3% prefix-cache hits, users at 20 tokens/s (ITL 50 ms);
    the default traffic is DeepSeek's published day. Published: ~73.7k input tokens/s per prefill
    node, ~14.8k output tokens/s per decode node (a fitted row: within 15%)."""
    out = moeserve_plan("--model", "deepseek-v3", "--gpu", "h800", "--prefill-ep", "32", "--decode-ep", "144",
                        "--cache-hit", "0.563", "--itl-ms", "50")  # fmt: skip
    (layout,) = out["layouts"]
    assert (layout["prefill_ep"], layout["decode_ep"]) == (32, 144)
    assert within(layout["input_tokens_per_s_per_node"], 73_700), layout
    assert within(layout["output_tokens_per_s_per_node"], 14_800), layout


def test_narrow_at_low_load_wide_at_high_load_and_the_crossover():
    low = moeserve_plan(
        "--model", "deepseek-v3", "--gpu", "h800", "--request-rate", "1", "--cache-hit", "0.563"
    )
    high = moeserve_plan(
        "--model", "deepseek-v3", "--gpu", "h800", "--request-rate", "2000", "--cache-hit", "0.563"
    )
    for out in (low, high):
        assert set(out) >= {"layouts", "recommendation", "crossover_request_rate"}
        assert all(set(x) == FIELDS for x in out["layouts"]) and set(out["recommendation"]) == FIELDS
        cheapest = min(x["usd_per_million_output_tokens"] for x in out["layouts"])
        assert out["recommendation"]["usd_per_million_output_tokens"] == cheapest
    assert low["recommendation"]["decode_ep"] <= 16 and low["recommendation"]["gpus"] <= 48
    assert high["recommendation"]["decode_ep"] >= 32 and high["recommendation"]["gpus"] > 200
    crossover = low["crossover_request_rate"]
    assert crossover == high["crossover_request_rate"] and 1 < crossover < 2000
    # A regime change: walking the rates up with hysteresis, the recommendation is narrow just below
    # the crossover and wide from it on, at every rate up to 2000/s.
    model, gpu = MODELS["deepseek-v3"], GPUS["h800"]
    narrow = (low["recommendation"]["prefill_ep"], low["recommendation"]["decode_ep"])
    keep, walked = narrow, []
    for k in range(-16, 27):
        rate = 10 ** (k / 8)
        rec = plan(model, gpu, Traffic(request_rate=rate, cache_hit=0.563), keep=keep)["recommendation"]
        keep = (rec.prefill_ep, rec.decode_ep)
        walked.append((rate, rec.decode_ep > narrow[1] or rec.prefill_ep > narrow[0]))
    assert [wide for rate, wide in walked if rate >= crossover] == [True] * sum(
        r >= crossover for r, _ in walked
    )
    assert [wide for rate, wide in walked if rate < crossover][-1] is False
    args = ["--model", "deepseek-v3", "--gpu", "h800", "--request-rate", "1"]
    table = subprocess.run([MOESERVE, "plan", *args], capture_output=True, text=True, timeout=60)
    assert (
        table.returncode == 0
        and "recommended:" in table.stdout
        and "become the cheapest above" in table.stdout
    )


def test_latency_targets_hold_and_bind():
    model, gpu = MODELS["deepseek-v3"], GPUS["h800"]
    loose = evaluate(model, gpu, Traffic(request_rate=50), 32, 144)
    tight = evaluate(model, gpu, Traffic(request_rate=50, itl_ms=40, ttft_ms=1500), 32, 144)
    assert tight.itl_ms <= 40 and tight.ttft_ms <= 1500 and loose.itl_ms <= 100 and loose.ttft_ms <= 5000
    assert tight.output_tokens_per_s_per_node < loose.output_tokens_per_s_per_node  # smaller batches
    assert tight.usd_per_million_output_tokens >= loose.usd_per_million_output_tokens


def test_every_built_in_model_and_gpu_plans():
    for name in ("deepseek-v3", "kimi-k2", "qwen3-235b"):
        for gpu in GPUS:  # the Hopper four, and the data-only ones (B300, H20, NVL72 racks, MI3xx)
            best = plan(MODELS[name], GPUS[gpu], Traffic(request_rate=100))["recommendation"]
            assert best.gpus > 0 and best.usd_per_million_output_tokens > 0
    b200 = plan(MODELS["deepseek-v3"], GPUS["b200"], Traffic(request_rate=100))["recommendation"]
    h800 = plan(MODELS["deepseek-v3"], GPUS["h800"], Traffic(request_rate=100))["recommendation"]
    assert b200.usd_per_million_output_tokens < h800.usd_per_million_output_tokens  # same price, faster GPU


def test_specs_load_from_config_json(tmp_path):
    ds = {"num_hidden_layers": 61, "hidden_size": 7168, "vocab_size": 129280, "num_attention_heads": 128,
          "n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
          "intermediate_size": 18432, "first_k_dense_replace": 3, "n_shared_experts": 1, "n_group": 8,
          "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
          "v_head_dim": 128, "topk_group": 4}  # fmt: skip
    spec = from_config(ds, "DeepSeek-V3")
    assert spec == MODELS["deepseek-v3"]
    (tmp_path / "config.json").write_text(json.dumps(ds))
    assert model_spec(str(tmp_path)).experts == 256
    out = moeserve_plan("--model", str(tmp_path), "--gpu", "h200", "--request-rate", "10")
    assert out["recommendation"]["gpus"] > 0


def test_plot_writes_an_svg_with_a_curve_per_width(tmp_path):
    path = tmp_path / "cost.svg"
    run = subprocess.run([MOESERVE, "plan", "--model", "deepseek-v3", "--gpu", "h800", "--plot", str(path)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    labels = [t.text for t in root.iter(f"{ns}text") if t.text and t.text.startswith("EP")]
    assert len(list(root.iter(f"{ns}path"))) == len(labels) >= 4 and "EP16" in labels and "EP144" in labels


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "gpt-9", "--gpu", "h800"], "unknown model 'gpt-9'"),
        (["--model", "deepseek-v3", "--gpu", "a100"], "unknown GPU 'a100'"),
        (["--model", "deepseek-v3", "--gpu", "h800", "--decode-ep", "8"], "does not fit on H800"),
        (["--model", "deepseek-v3", "--gpu", "h800", "--itl-ms", "1"], "ITL"),
        (["--model", "deepseek-v3", "--gpu", "h800", "--plot", "x.png"], "SVG"),
        (["--model", "deepseek-v3", "--gpu", "h800", "--output", "yaml"], "table or json"),
        (["--model", "deepseek-v3"], "name the GPU once"),
        (["--model", "deepseek-v3", "--gpu", "h800", "--gpu-spec", "x.json"], "name the GPU once"),
    ],
)
def test_bad_requests_are_clear_errors(args, message):
    run = subprocess.run([MOESERVE, "plan", *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr, run.stderr


def test_the_json_contract_is_versioned_echoes_its_inputs_and_gives_reasons_to_programs():
    """Issue 28: a version, the inputs echoed, each layout's per-GPU operating point, and why
    (chosen, left out) as codes a program can read, beside the words."""
    args = ["--model", "deepseek-v3", "--gpu", "h800", "--request-rate", "50", "--itl-ms", "40"]
    out = moeserve_plan(*args)
    assert out["version"] == 2
    inputs = out["inputs"]
    assert (inputs["model"], inputs["model_arg"], inputs["gpu"], inputs["gpus_per_node"]) == (
        "DeepSeek-V3", "deepseek-v3", "H800", 8,
    )  # fmt: skip
    assert inputs["traffic"]["request_rate"] == 50 and inputs["traffic"]["itl_ms"] == 40
    assert inputs["prefill_eps"] == [8, 16, 32, 64] and 144 in inputs["decode_eps"]
    best = out["recommendation"]
    assert best["decode_batch_per_gpu"] >= 1 and 0 < best["decode_step_ms"] <= 40
    assert best["prefill_chunk_per_gpu"] >= 256 and 0 < best["prefill_utilization"] <= 0.95
    reason = out["reason"]
    assert reason["rule"] == "cheapest_per_output_token" and reason["layouts_compared"] == len(out["layouts"])
    assert reason["itl_ms_target"] == 40 and reason["runner_up"]["extra_cost"] >= 0
    codes = {(s["code"], s["role"]) for s in out["skipped"]}
    assert ("does_not_fit", "prefill") in codes  # DeepSeek-V3 FP8 does not fit EP8 on 80 GB
    assert all(set(s) == {"code", "role", "ep", "message"} and s["message"] for s in out["skipped"])


RACK = {  # B200's figures (specs.py) in trays of 4 joined into one 72-GPU NVLink domain
    "name": "B200 in an NVL72 rack", "hbm_gb": 180, "hbm_tb_s": 8.0, "fp8_tflops": 4500, "bf16_tflops": 2250,
    "nvlink_gb_s": 900, "nic_gb_s": 50, "gpus_per_node": 4, "nvlink_domain": 72, "source": "test",
}  # fmt: skip


def test_a_gpu_spec_file_describes_an_nvlink_domain_apart_from_the_node(tmp_path):
    """Issue 28: NVLink reach and the per-node reporting unit are two figures. In a 72-GPU
    domain an EP72 decode group exchanges tokens over NVLink alone; in trays of 4 on their own it
    goes over the NICs, and the same GPUs deliver less."""
    rack, trays = tmp_path / "nvl72.json", tmp_path / "trays.json"
    rack.write_text(json.dumps(RACK))
    trays.write_text(json.dumps({**RACK, "nvlink_domain": 0}))
    args = ["--model", "deepseek-v3", "--prefill-ep", "16", "--decode-ep", "72", "--request-rate", "20"]
    in_rack, apart = moeserve_plan(*args, "--gpu", str(rack)), moeserve_plan(*args, "--gpu", str(trays))
    assert (in_rack["inputs"]["gpus_per_node"], in_rack["inputs"]["nvlink_domain"]) == (4, 72)
    (x,) = in_rack["layouts"]  # per node (a tray of 4) and per GPU: two reporting units
    assert x["output_tokens_per_s_per_node"] == pytest.approx(4 * x["output_tokens_per_s_per_gpu"], rel=1e-3)
    by_spec = moeserve_plan(*args, "--gpu-spec", str(rack))  # the spelling of a spec file
    assert by_spec["layouts"] == in_rack["layouts"]
    assert apart["inputs"]["nvlink_domain"] == 4
    rack_best, trays_best = in_rack["recommendation"], apart["recommendation"]
    for best in (rack_best, trays_best):
        assert all(math.isfinite(v) for v in best.values() if isinstance(v, float))
    assert rack_best["output_tokens_per_s_per_node"] > trays_best["output_tokens_per_s_per_node"]
    # An 8-GPU node's spec as a file plans exactly as the built-in does.
    h800 = tmp_path / "h800.json"
    fields = (
        "name",
        "hbm_gb",
        "hbm_tb_s",
        "fp8_tflops",
        "bf16_tflops",
        "nvlink_gb_s",
        "nic_gb_s",
        "gpus_per_node",
    )
    h800.write_text(json.dumps({f: getattr(GPUS["h800"], f) for f in fields}))
    base = ["--model", "deepseek-v3", "--request-rate", "20"]
    assert (
        moeserve_plan(*base, "--gpu", str(h800))["layouts"]
        == moeserve_plan(*base, "--gpu", "h800")["layouts"]
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ({k: v for k, v in RACK.items() if k != "hbm_gb"}, "missing ['hbm_gb']"),
        ({**RACK, "hbm": 1}, "unknown keys ['hbm']"),
        ({**RACK, "nic_gb_s": -1}, "nic_gb_s must be a number >= 0"),
        ({**RACK, "fp8_tflops": "lots"}, "fp8_tflops must be a number"),
        ({**RACK, "gpus_per_node": 0}, "must be positive"),
    ],
)
def test_a_bad_gpu_spec_file_is_a_clear_error(tmp_path, spec, message):
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(spec))
    run = subprocess.run(
        [MOESERVE, "plan", "--model", "deepseek-v3", "--gpu", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and message in run.stderr, run.stderr


def test_a_3_percent_rate_step_flips_the_recommendation_only_past_the_margin():
    """Issue 28: between 65 and 2,900 requests/s in 3% steps the cheapest layout changed 57 times
    (whole-group rounding, costs within a few percent). With the layout in use kept while it costs
    within the margin, a step changes it only when it has fallen further behind than that."""
    model, gpu = MODELS["deepseek-v3"], GPUS["h800"]
    rate, keep, flips, cheapest_changes, last_cheapest = 65.0, None, 0, 0, None
    while rate <= 2900:
        out = plan(model, gpu, Traffic(request_rate=rate), keep=keep)  # the default margin, 10%
        rec, layouts = out["recommendation"], out["layouts"]
        cheapest = min(layouts, key=lambda x: x.usd_per_million_output_tokens)
        if keep is not None and (rec.prefill_ep, rec.decode_ep) != keep:
            flips += 1
            held = next((x for x in layouts if (x.prefill_ep, x.decode_ep) == keep), None)
            assert (
                held is None
                or held.usd_per_million_output_tokens > 1.05 * cheapest.usd_per_million_output_tokens
            )
        key = (cheapest.prefill_ep, cheapest.decode_ep)
        cheapest_changes += last_cheapest is not None and key != last_cheapest
        keep, last_cheapest, rate = (rec.prefill_ep, rec.decode_ep), key, rate * 1.03
    assert flips <= 10 and cheapest_changes >= 4 * flips, (flips, cheapest_changes)


def test_fp4_experts_and_an_fp8_kv_cache_are_expressed_and_move_the_answer_their_way():
    """Issue 28: FP4 (NVFP4) experts take 4.5 bits a weight (and a GPU's FP4 peak where it has
    one); an FP8 KV cache halves the KV bytes. Both are command-line inputs, echoed, with finite
    answers. On H100s: the FP8 KV cache doubles what a decode GPU holds (71 -> 142 requests) and
    cuts the cost; FP4 experts free HBM for more still."""
    base = ["--model", "deepseek-v3", "--gpu", "h100", "--request-rate", "50", "--decode-ep", "32"]
    plain = moeserve_plan(*base)
    fp8_kv = moeserve_plan(*base, "--kv-cache", "fp8")
    both = moeserve_plan(*base, "--kv-cache", "fp8", "--experts", "fp4")
    assert both["inputs"]["traffic"]["precision"] == {
        "kv_cache": "fp8",
        "experts": "fp4",
        "attention": "bf16",
    }
    for out in (plain, fp8_kv, both):
        assert all(math.isfinite(v) for x in out["layouts"] for v in x.values() if isinstance(v, float))

    def at(out: dict) -> dict:
        return next(x for x in out["layouts"] if (x["prefill_ep"], x["decode_ep"]) == (16, 32))

    assert at(fp8_kv)["decode_batch_per_gpu"] >= 2 * at(plain)["decode_batch_per_gpu"] - 1
    assert at(fp8_kv)["usd_per_million_output_tokens"] < at(plain)["usd_per_million_output_tokens"]
    assert at(both)["decode_batch_per_gpu"] > at(fp8_kv)["decode_batch_per_gpu"]
    on_b200 = moeserve_plan(
        "--model", "deepseek-v3", "--gpu", "b200", "--experts", "fp4", "--request-rate", "50"
    )
    assert on_b200["recommendation"]["usd_per_million_output_tokens"] > 0
    run = subprocess.run(
        [MOESERVE, "plan", *base, "--experts", "int2"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and "experts fp8|fp4" in run.stderr


def test_the_sensitivity_table_shows_how_far_each_unstated_knob_moves_the_answer():
    """Issue 28: every knob no publication states, at each value tried, against the defaults."""
    out = moeserve_plan("--model", "deepseek-v3", "--gpu", "h800", "--request-rate", "100", "--sensitivity")
    rows = out["sensitivity"]
    assert {r["knob"] for r in rows} == {
        "length_cv", "balancedness", "cache_hit", "overlap_prefill", "overlap_decode", "memory_fraction",
        "max_decode_batch",
    }  # fmt: skip
    assert all(sum(r["default"] for r in rows if r["knob"] == k) == 1 for k in {r["knob"] for r in rows})
    best = out["recommendation"]
    for r in (r for r in rows if r["default"]):  # the defaults reproduce the answer
        assert r["layout"] == f"{best['prefill_ep']}/{best['decode_ep']}" and r["cost_ratio"] == 1.0, r
    cost = {(r["knob"], r["value"]): r["cost_ratio"] for r in rows}
    output = {(r["knob"], r["value"]): r["output_per_node_ratio"] for r in rows}
    assert cost[("balancedness", 0.55)] > 1.02 and output[("balancedness", 0.55)] < 0.95  # EPLB bench, s = 1
    assert cost[("length_cv", 2.0)] > 1.1 and cost[("cache_hit", 0.563)] < 0.9
    assert all(set(r) == {"knob", "value", "default", "why", "layout", "cost_ratio", "output_per_node_ratio"}
               for r in rows)  # fmt: skip


def test_the_built_in_gpus_name_their_sources_and_the_racks_their_domain():
    for key, spec in GPUS.items():
        assert spec.source or key in ("h800", "h100", "h200", "b200"), (
            key
        )  # those four: the comment above GPUS
        assert spec.fp8_tflops > spec.bf16_tflops > 0 and spec.hbm_gb > 0
    for rack in ("gb200-nvl72", "gb300-nvl72"):
        assert (GPUS[rack].domain, GPUS[rack].gpus_per_node) == (72, 4)
    assert GPUS["h800"].domain == 8 and GPUS["mi300x"].fp4_tflops == 0 and GPUS["mi355x"].fp4_tflops > 0


def test_the_techniques_are_command_line_inputs_echoed_with_clear_errors():
    """Issue 28: FP8 attention, TP/DP prefill, MTP, offload, the batch cap and two-batch overlap are
    inputs, echoed in the JSON, each moving the answer its way; nonsense is a clear error."""
    rack = moeserve_plan("--model", "deepseek-r1", "--gpu", "gb200-nvl72", "--experts", "fp4", "--kv-cache",
                         "fp8", "--attention", "fp8", "--request-rate", "100")  # fmt: skip
    assert rack["inputs"]["nvlink_domain"] == 72 and rack["inputs"]["gpus_per_node"] == 4
    assert rack["inputs"]["traffic"]["precision"] == {"kv_cache": "fp8", "experts": "fp4", "attention": "fp8"}
    assert all(math.isfinite(v) for x in rack["layouts"] for v in x.values() if isinstance(v, float))
    h200 = ["--model", "deepseek-v3", "--gpu", "h200", "--request-rate", "20"]
    tp = moeserve_plan(*h200, "--prefill-parallel", "tp")
    assert tp["inputs"]["traffic"]["techniques"]["prefill_parallel"] == "tp"
    assert {x["prefill_ep"] for x in tp["layouts"]} == {8}  # TP stays inside the 8-GPU NVLink domain
    assert {(s["code"], s["ep"]) for s in tp["skipped"]} >= {
        ("beyond_nvlink_domain", w) for w in (16, 32, 64)
    }
    one = ["--prefill-ep", "32", "--decode-ep", "72", "--gpu", "h100", "--model", "deepseek-v3"]
    base = moeserve_plan(*one)["layouts"][0]
    capped = moeserve_plan(*one, "--max-decode-batch", "16")["layouts"][0]
    exposed = moeserve_plan(*one, "--no-two-batch-overlap")["layouts"][0]
    mtp = moeserve_plan(*one, "--mtp-draft", "1", "--mtp-acceptance", "0.85", "--itl-ms", "20")["layouts"][0]
    plain = moeserve_plan(*one, "--itl-ms", "20")["layouts"][0]
    # Offload: 50 GB of each prefill GPU's weights in host memory let EP8 prefill hold DeepSeek-V3.
    narrow = ["--model", "deepseek-v3", "--gpu", "h100", "--prefill-ep", "8", "--decode-ep", "72"]
    run = subprocess.run([MOESERVE, "plan", *narrow], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "does not fit on H100 at prefill EP8" in run.stderr
    offload = moeserve_plan(*narrow, "--offload-gb", "50")["layouts"][0]
    assert offload["prefill_ep"] == 8 and offload["input_tokens_per_s_per_node"] > 0
    assert capped["decode_batch_per_gpu"] == 16
    assert exposed["output_tokens_per_s_per_node"] < base["output_tokens_per_s_per_node"]
    assert mtp["output_tokens_per_s_per_node"] > plain["output_tokens_per_s_per_node"]
    for args, message in [
        (["--mtp-acceptance", "0.8"], "needs drafted tokens"),
        (["--prefill-parallel", "pp"], "ep, tp or dp"),
        (["--attention", "int8"], "attention bf16|fp8"),
        (["--prefill-parallel", "tp", "--prefill-ep", "16"], "spans more than one NVLink domain"),
    ]:
        run = subprocess.run([MOESERVE, "plan", *h200, *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)
