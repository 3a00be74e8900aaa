import json
import shutil

import pytest
import torch

from services.models import ModelConfig, ModelConfigError, load_model
from services.models.layers import rope_inv_freq

DS = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "max_position_embeddings": 8192,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": None,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
}


def test_deepseek_real_checkpoint_spellings():
    cfg = ModelConfig.from_dict(DS)
    assert cfg.family == "deepseek_v3" and cfg.is_mla
    assert cfg.num_experts == 8 and cfg.moe_layers == (1, 2, 3)
    assert cfg.rope.kind == "yarn" and cfg.rope.factor == 40 and cfg.rope.theta == 10000
    assert cfg.rope.interleave and cfg.rope.dim == 8
    assert cfg.kv_entry_shape == (16 + 8,)


def test_expert_count_spellings_and_rope_parameters():
    base = {k: v for k, v in DS.items() if k not in ("n_routed_experts", "rope_scaling", "rope_theta")}
    for spelling in ("num_experts", "num_local_experts", "n_routed_experts"):
        cfg = ModelConfig.from_dict({**base, spelling: 8})
        assert cfg.num_experts == 8
    cfg = ModelConfig.from_dict({**base, "num_local_experts": 8, "rope_parameters": {"rope_theta": 5.0}})
    assert cfg.rope.kind == "default" and cfg.rope.theta == 5.0


def test_qwen3_layers_and_gqa_shape():
    raw = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 4096,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
        "rope_theta": 1e6,
    }
    cfg = ModelConfig.from_dict(raw)
    assert cfg.moe_layers == (1,)
    assert cfg.kv_entry_shape == (2, 2, 8)
    assert not cfg.norm_topk_prob


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "unsupported architecture ['LlamaForCausalLM'] in field"),
        ({"hidden_size": None}, "missing required field 'hidden_size'"),
        (
            {"quantization_config": {"quant_method": "awq", "bits": 4}},
            "quantization_config.quant_method='awq'",
        ),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config.weight_block_size=None"),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}},
            "quantization_config.fmt='e5m2'",
        ),
        (
            {
                "quantization_config": {
                    "quant_method": "fp8",
                    "weight_block_size": [128, 128],
                    "activation_scheme": "static",
                }
            },
            "quantization_config.activation_scheme='static'",
        ),
        ({"rope_scaling": {"type": "longrope"}}, "unsupported rope type 'longrope'"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ({"n_group": 3}, "not divisible by n_group=3"),
    ],
)
def test_unsupported_configs_name_the_field(change, message):
    with pytest.raises(ModelConfigError, match=r"^/m/config\.json: ") as e:
        ModelConfig.from_dict({**DS, **change}, source="/m/config.json")
    assert message in str(e.value)


def test_yarn_matches_transformers():
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig.from_dict(DS)
    hf = DeepseekV3Config(**{k: v for k, v in DS.items() if k != "architectures"})
    ref, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](hf)
    ours, scale = rope_inv_freq(cfg.rope)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert scale == pytest.approx(ref_scale)


def test_unsupported_architecture_directory(tmp_path, ds_dir):
    bad = tmp_path / "bad"
    shutil.copytree(ds_dir, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["architectures"] = ["MixtralForCausalLM"]
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(
        ModelConfigError, match=r"bad/config.json: unsupported architecture \['MixtralForCausalLM'\]"
    ):
        load_model(bad)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ModelConfigError, match=r"has no config\.json"):
        load_model(tmp_path)
    with pytest.raises(ModelConfigError, match="does not exist"):
        load_model(tmp_path / "nope")
