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
from services.models.fp8 import Fp8Linear, block_scaled_mm
from services.models.moe import RoutedExperts
from services.tools.synthetic import quantize_block_fp8
from tests.fp8 import dequantize_by_blocks, read_tensors
from tests.oracle import greedy_ids
from tests.ranks import run_ranks
from tests.services.engine.test_parity import run_prefill
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


def test_a_layer_past_the_stack_is_an_error_unless_config_names_mtp_layers(fp8_dirs, tmp_path):
    d = _copy(fp8_dirs["deepseek_v3"][0], tmp_path / "no-nextn")
    config = json.loads((d / "config.json").read_text())
    del config["num_nextn_predict_layers"]  # the checkpoint still holds layer 3
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelConfigError, match=r"no DeepseekV3ForCausalLM parameter takes: model\.layers\.3\."
    ):
        load_model(d)


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


# -- weights kept in FP8 (`fp8="keep"`): block-scaled GEMMs, the reference kernel on CPU ---------


def _kept_pairs(keep, deq):
    """(kept FP8 weight, its scale, the dequantized model's weight) for every layer kept in FP8."""
    params = dict(deq.named_parameters())
    for name, module in keep.named_modules():
        if isinstance(module, Fp8Linear):
            yield module.weight, module.weight_scale_inv, params[f"{name}.weight"]
        elif isinstance(module, RoutedExperts) and module.fp8_native is not None:
            for s in range(module.w13.shape[0]):
                yield module.w13[s], module.w13_scale_inv[s], params[f"{name}.w13"][s]
                yield module.w2[s], module.w2_scale_inv[s], params[f"{name}.w2"][s]


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_fp8_weights_are_the_checkpoints_own(fp8_aligned_dirs, family):
    keep, _ = load_model(fp8_aligned_dirs[family], fp8="keep")
    deq, _ = load_model(fp8_aligned_dirs[family], fp8="dequantize")
    pairs = list(_kept_pairs(keep, deq))
    assert len(pairs) > 40
    for w, scale, ref in pairs:
        assert w.dtype == torch.float8_e4m3fn
        assert torch.equal(dequantize_by_blocks(w, scale), ref)
    report = keep.load_report
    assert report.fp8_kept > 50 and "reference GEMM: no native FP8 GEMM on cpu" in report.summary()
    assert report.weight_bytes < 0.4 * deq.load_report.weight_bytes  # one byte per weight, not four


def test_block_scaled_mm_is_deepseeks_w8a8_recipe():
    """Activations quantized per token and 128 columns, weights per 128x128 block: checked against
    the recipe written out element by element."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=g)
    w, scale = quantize_block_fp8(torch.randn(200, 256, generator=g))
    expected = torch.empty(5, 200)
    wd = dequantize_by_blocks(w, scale)
    for t in range(5):
        row = torch.empty(256)
        for c in range(0, 256, 128):
            group = x[t, c : c + 128]
            s = group.abs().max() / 448.0
            row[c : c + 128] = (group / s).to(torch.float8_e4m3fn).float() * s
        expected[t] = wd @ row
    got = block_scaled_mm(x, w, scale, native=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - x @ wd.t()).norm() / (x @ wd.t()).norm() < 0.06  # FP8 activations: a few percent


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kept_layer_computes_its_dequantized_twin(fp8_aligned_dirs, family):
    """Each layer kept in FP8, on random inputs, against the same layer of the dequantized model:
    within the error of FP8 activations. (Whole-model logits are no measure on a random tiny model:
    a few percent flips near-tied expert choices, and the outputs part ways.)"""
    keep, _ = load_model(fp8_aligned_dirs[family], fp8="keep")
    deq, _ = load_model(fp8_aligned_dirs[family], fp8="dequantize")
    twins = dict(deq.named_modules())
    g = torch.Generator().manual_seed(1)
    checked = 0
    for name, module in keep.named_modules():
        if isinstance(module, Fp8Linear):
            x = torch.randn(7, module.in_features, generator=g)
            pairs = [(module(x), twins[name](x))]
        elif isinstance(module, RoutedExperts) and module.fp8_native is not None:
            x = torch.randn(7, module.w13.shape[2], generator=g)
            pairs = [(module._expert(e, x), twins[name]._expert(e, x)) for e in range(module.w13.shape[0])]
        else:
            continue
        for got, ref in pairs:
            assert (got - ref).norm() / ref.norm() < 0.08, name
            checked += 1
    assert checked > 40


def keep_generate(rank: int, world: int, model_dir: str) -> list[list[int]]:
    from services.ep import ExpertParallel, ExpertPlacement, create

    dispatcher = create("torch") if world > 1 else None

    def parallel(cfg):
        placement = ExpertPlacement.default(len(cfg.moe_layers), cfg.num_experts, cfg.num_experts, world)
        return ExpertParallel(placement, rank, dispatcher)

    engine = Engine.from_pretrained(model_dir, parallel=parallel, fp8="keep")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return [o.output_token_ids for o in engine.generate(PROMPTS[rank::world], params)]


def test_kept_fp8_experts_at_ep2_match_one_rank(fp8_aligned_dirs):
    d = str(fp8_aligned_dirs["deepseek_v3"])
    (single,) = run_ranks(1, keep_generate, d)
    r0, r1 = run_ranks(2, keep_generate, d)
    assert [r0[0], r1[0], r0[1]] == single


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cublas_block_scaled_gemm_on_cuda(fp8_aligned_dirs, family):
    """On a GPU: the cuBLAS FP8 path computes what the reference W8A8 path computes (greedy tokens
    equal for 16 tokens, logits close), and stays close to the dequantized bf16 model."""
    from services.models.fp8 import native_supported

    if not native_supported(torch.device("cuda")):
        pytest.skip("gpu test: needs compute capability 9.0+ and torch's blockwise scaled_mm")
    d = fp8_aligned_dirs[family]
    native = Engine.from_pretrained(d, dtype="bfloat16", device="cuda", fp8="keep")
    assert "cuBLAS block-scaled GEMM" in native.model.load_report.summary()
    reference = Engine.from_pretrained(d, dtype="bfloat16", device="cuda", fp8="keep")
    for module in reference.model.modules():
        if isinstance(module, Fp8Linear):
            module.native = False
        elif isinstance(module, RoutedExperts) and module.fp8_native is not None:
            module.fp8_native = False
    deq = Engine.from_pretrained(d, dtype="bfloat16", device="cuda", fp8="dequantize")
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    a = [o.output_token_ids for o in native.generate(PROMPTS, params)]
    b = [o.output_token_ids for o in reference.generate(PROMPTS, params)]
    assert a == b
    cfg = native.model_config
    ids = list(range(3, 40))
    la = run_prefill(native.model, cfg, ids, 1000, device="cuda").float()
    lb = run_prefill(reference.model, cfg, ids, 1000, device="cuda").float()
    lc = run_prefill(deq.model, cfg, ids, 1000, device="cuda").float()
    assert torch.nn.functional.cosine_similarity(la, lb, dim=-1).min() > 0.999
    assert torch.nn.functional.cosine_similarity(la, lc, dim=-1).min() > 0.98
