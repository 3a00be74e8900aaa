"""FP8 block-quantized checkpoints in the official layout: exact against transformers on the
dequantized weights, MTP layers skipped and reported, unsupported schemes and stray tensors named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from services.engine import Engine, SamplingParams
from services.models import ModelConfigError, load_model
from tests.fp8 import read_tensors
from tests.oracle import greedy_ids
from tests.ranks import run_ranks
from tests.services.ep.test_ep_engine import ep_generate, make_prompts

FAMILIES = ("deepseek_v3", "qwen3_moe")
PROMPTS = [[5, 6, 7, 8], list(range(20, 50)), [300, 2, 77]]


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_checkpoint_decodes_like_transformers_on_the_dequantized_weights(fp8_dirs, family):
    fp8, dequantized = fp8_dirs[family]
    assert len(list(fp8.glob("*.safetensors"))) > 1 and (fp8 / "model.safetensors.index.json").is_file()
    engine = Engine.from_pretrained(fp8)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    got = [o.output_token_ids for o in engine.generate(PROMPTS, params)]
    assert got == [greedy_ids(dequantized, p, 12) for p in PROMPTS]


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_weights_dequantize_exactly_including_partial_edge_blocks(fp8_dirs, family):
    fp8, dequantized = fp8_dirs[family]
    ours, _ = load_model(fp8)
    ref, _ = load_model(dequantized)
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    report = ours.load_report
    quantized = [n for n in read_tensors(fp8) if n.endswith("_scale_inv")]
    # Every quantized weight the engine holds was dequantized (MTP ones are skipped, not read).
    mtp = [n for n in quantized if n.startswith("model.layers.3.")]
    assert report.quantized_tensors == len(quantized) - len(mtp) > 50


def test_mtp_layers_are_skipped_and_reported(fp8_dirs):
    fp8, _ = fp8_dirs["deepseek_v3"]
    names = read_tensors(fp8)
    mtp = [n for n in names if n.startswith("model.layers.3.") and not n.endswith("_scale_inv")]
    assert any(n.endswith("eh_proj.weight") for n in mtp) and any("shared_head" in n for n in mtp)
    report = load_model(fp8)[0].load_report
    assert report.mtp_layers == (3,) and report.skipped["mtp"] == len(mtp)
    assert "multi-token-prediction layer(s) 3 skipped" in report.summary()
    # Not a byte of them was read.
    assert report.bytes_read < report.checkpoint_bytes


def test_fp8_at_ep2_is_exact(fp8_dirs):
    fp8, dequantized = fp8_dirs["deepseek_v3"]
    counts = [1, 2]
    got = run_ranks(2, ep_generate, str(fp8), counts)
    prompts = make_prompts(sum(counts))
    expected = [greedy_ids(dequantized, p, 2 + 10 * (i > 0)) for i, p in enumerate(prompts)]
    assert got[0] + got[1] == expected


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unsupported_quantization_is_named(fp8_dirs, tmp_path):
    d = _copy(fp8_dirs["qwen3_moe"][0], tmp_path / "awq")
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match=r"quantization_config\.quant_method='awq' is not supported"):
        load_model(d)


def test_fp8_tensors_without_quantization_config_or_scale_are_named(fp8_dirs, tmp_path):
    d = _copy(fp8_dirs["qwen3_moe"][0], tmp_path / "noquant")
    config = json.loads((d / "config.json").read_text())
    del config["quantization_config"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelConfigError, match=r"has a block scale but config\.json has no quantization_config"
    ):
        load_model(d)
    d = _copy(fp8_dirs["qwen3_moe"][0], tmp_path / "noscale")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    shard = d / index["weight_map"].pop(victim)
    tensors = read_tensors_of(shard)
    del tensors[victim]
    save_file(tensors, str(shard))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelConfigError, match=r"o_proj\.weight is torch\.float8_e4m3fn without a"):
        load_model(d)


def test_a_tensor_no_parameter_takes_is_an_error(fp8_dirs, tmp_path):
    d = _copy(fp8_dirs["qwen3_moe"][0], tmp_path / "stray")
    save_file({"model.layers.0.mlp.mystery.weight": torch.zeros(2, 2)}, str(d / "extra.safetensors"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.mystery.weight"] = "extra.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelConfigError, match=r"tensors no Qwen3MoeForCausalLM parameter takes: .*mystery"):
        load_model(d)


def read_tensors_of(shard):
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
