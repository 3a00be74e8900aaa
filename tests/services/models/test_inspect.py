"""`moeserve inspect-model`: sizes from config.json alone, checked against published figures and
against what a loaded rank really holds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

from services.ep import ExpertParallel, ExpertPlacement, create
from services.models import ModelConfig, load_model
from services.models.loading.inspect import ModelSize, footprint, parse_bytes, smallest_ep
from tests.ranks import run_ranks

DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "first_k_dense_replace": 3,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
}
KIMI_K2 = {
    **DEEPSEEK_V3,
    "vocab_size": 163840,
    "num_attention_heads": 64,
    "n_routed_experts": 384,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
}
QWEN3_235B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 94,
    "num_attention_heads": 64,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "max_position_embeddings": 40960,
}


@pytest.mark.parametrize(
    "raw, total, active",
    [
        (DEEPSEEK_V3, 671e9, 37e9),  # DeepSeek-V3 technical report: 671B total, 37B activated
        (KIMI_K2, 1.0e12, 32e9),  # Kimi K2 model card: 1T total, 32B activated
        (QWEN3_235B, 235e9, 22e9),  # Qwen3-235B-A22B: 235B total, 22B activated
    ],
)
def test_published_model_sizes(raw, total, active):
    size = ModelSize.of(ModelConfig.from_dict(raw))
    assert size.total_params == pytest.approx(total, rel=0.03)
    assert size.active_params == pytest.approx(active, rel=0.04)


def test_deepseek_v3_kv_per_token_and_the_smallest_group():
    size = ModelSize.of(ModelConfig.from_dict(DEEPSEEK_V3))
    rank = footprint(size, 32, "bfloat16", kv_tokens=65536)
    assert rank.kv_bytes == 65536 * 61 * (512 + 64) * 2  # MLA: latent + rope key per layer
    assert rank.slots_per_rank == 8
    # A bf16 DeepSeek-V3 rank holds ~32 GiB of dense weights whatever the EP width: EP16 needs
    # 76 GiB of experts on top, so 80 GiB first fits at EP32.
    assert smallest_ep(size, "bfloat16", 65536, parse_bytes("80GiB")) == 32


FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def test_fp8_deepseek_v3_is_priced_at_one_byte_per_kept_weight():
    """The official FP8 release with its weights kept in FP8 (as on Hopper) fits 80 GiB at EP16;
    priced as if dequantized to bf16 it would need EP32 (today's figure was EP48: bf16 throughout)."""
    size = ModelSize.of(ModelConfig.from_dict({**DEEPSEEK_V3, "quantization_config": FP8}))
    assert size.fp8_experts and size.fp8_dense_params > 0.8 * (size.dense_params - 2 * 129280 * 7168)
    memory = parse_bytes("80GiB")
    assert smallest_ep(size, "bfloat16", 65536, memory, fp8=True) == 16
    assert smallest_ep(size, "bfloat16", 65536, memory, fp8=False) == 32
    kept, bf16 = (footprint(size, 16, "bfloat16", 0, fp8=keep) for keep in (True, False))
    assert kept.expert_bytes == pytest.approx(bf16.expert_bytes / 2, rel=1e-3)  # scales: a hair over 1 B
    assert kept.dense_bytes < 0.6 * bf16.dense_bytes


def test_an_ep_width_that_does_not_divide_the_experts_gets_redundant_slots():
    """DeepSeek-V3 decode at EP144: 256 experts need 288 slots (32 redundant), 2 per rank."""
    size = ModelSize.of(ModelConfig.from_dict(DEEPSEEK_V3))
    rank = footprint(size, 144, "bfloat16", kv_tokens=0)
    assert rank.slots_per_rank == 2
    with pytest.raises(ValueError, match="288 would"):
        footprint(size, 144, "bfloat16", kv_tokens=0, slots=256)


def test_tiny_model_counts_match_transformers(model_dirs):
    for name in ("deepseek_v3", "qwen3_moe"):
        d = model_dirs[name]
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        # DeepSeek's routing bias is a buffer in transformers and a parameter here.
        expected = sum(p.numel() for p in hf.parameters()) + sum(
            b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias")
        )
        assert ModelSize.of(ModelConfig.from_dir(d)).total_params == expected, name


def loaded_bytes(rank: int, world: int, model_dir: str) -> int:
    dispatcher = create("torch")

    def parallel(cfg):
        placement = ExpertPlacement.default(len(cfg.moe_layers), cfg.num_experts, cfg.num_experts, world)
        return ExpertParallel(placement, rank, dispatcher)

    model, _ = load_model(model_dir, parallel=parallel)
    return model.load_report.weight_bytes


def test_rank_footprint_is_what_a_loaded_rank_holds(model_dirs):
    d = model_dirs["deepseek_v3"]
    rank = footprint(ModelSize.of(ModelConfig.from_dir(d)), 2, "float32", kv_tokens=0)
    assert run_ranks(2, loaded_bytes, str(d)) == [rank.dense_bytes + rank.expert_bytes] * 2


def test_cli_json(model_dirs):
    flags = ["--ep", "4", "--kv-tokens", "1000", "--device-memory", "100KiB", "--output", "json"]
    out = subprocess.run(
        [sys.executable, "-m", "services.tools.cli", "inspect-model", str(model_dirs["qwen3_moe"]), *flags],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(out.stdout)
    assert r["architecture"] == "Qwen3MoeForCausalLM" and r["rank"]["ep"] == 4
    assert r["rank"]["slots_per_rank"] == 4 and r["kv_bytes_per_token"] == 3 * 2 * 2 * 16 * 2
    assert r["fits"] is False and r["smallest_ep_that_fits"] is None
    assert r["checkpoint_bytes"] > 0
    assert r["slots"] == 16 and r["redundant_experts"] == 0 and r["weights"] == "bfloat16"
