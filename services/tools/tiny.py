"""Tiny random-weight checkpoints for tests, demos and benchmarks; nothing is downloaded.

`make_tiny_model(dir, arch)` builds the model with `transformers` from a small config (the same
classes real checkpoints load into), saves it as safetensors, and adds a byte-level BPE tokenizer
trained on a built-in text, with special tokens and a chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, cast

Arch = Literal["deepseek_v3", "qwen3_moe"]
ARCHS: tuple[Arch, ...] = ("deepseek_v3", "qwen3_moe")

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
TOKENIZER_VOCAB = 480
MODEL_VOCAB = 512

_CORPUS = """\
Mixture-of-experts models route every token to a few experts out of many. DeepSeek-V3 keeps a
compressed latent key-value cache with multi-head latent attention, and Qwen3 uses grouped-query
attention. Prefill computes the prompt; decode generates one token at a time. The KV cache moves
from the prefill worker to the decode worker over RDMA. Hello, world! How are you today? I am fine,
thank you. What is a mixture of experts? It is a neural network with many feed-forward experts and
a router that picks the best ones for each token. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Unicode: café, naïve, 東京, 😀, ü, ß, ñ. The quick brown fox jumps over the lazy dog.
"""


def _deepseek_config(q_lora_rank: int | None) -> dict[str, Any]:
    return dict(
        vocab_size=MODEL_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        kv_lora_rank=32,
        q_lora_rank=q_lora_rank,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=2048,
        initializer_range=0.2,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )


def _qwen3_config() -> dict[str, Any]:
    return dict(
        vocab_size=MODEL_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        mlp_only_layers=[0],
        max_position_embeddings=2048,
        initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )


def build_tokenizer(out_dir: Path) -> dict[str, int]:
    """Train and save a byte-level BPE tokenizer; returns the special tokens' ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    # Trained in as special tokens, so each has an id (token_to_id says int | None).
    ids = {t: cast(int, tok.token_to_id(t)) for t in SPECIAL_TOKENS}
    added = {
        str(i): {
            "content": t,
            "special": True,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
        for t, i in ids.items()
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": PAD,
                "add_bos_token": False,
                "add_eos_token": False,
                "model_max_length": 2048,
                "chat_template": CHAT_TEMPLATE,
                "added_tokens_decoder": added,
            },
            indent=2,
        )
    )
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2)
    )
    return ids


def make_tiny_model(
    out_dir: str | Path,
    arch: Arch = "deepseek_v3",
    *,
    seed: int = 0,
    q_lora_rank: int | None = 48,
    overrides: dict[str, Any] | None = None,
    max_shard_size: str | None = None,
) -> Path:
    """Write a tiny random `arch` checkpoint with tokenizer into `out_dir` and return the path."""
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = build_tokenizer(out)
    ids = dict(bos_token_id=special[BOS], eos_token_id=special[EOS], pad_token_id=special[PAD])
    cfg: Any  # the arch's own config class: the one model_cls takes
    model_cls: type[transformers.PreTrainedModel]
    if arch == "deepseek_v3":
        cfg = transformers.DeepseekV3Config(**{**_deepseek_config(q_lora_rank), **ids, **(overrides or {})})
        model_cls = transformers.DeepseekV3ForCausalLM
    else:
        cfg = transformers.Qwen3MoeConfig(**{**_qwen3_config(), **ids, **(overrides or {})})
        model_cls = transformers.Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()  # type: ignore[no-untyped-call]  # transformers' eval() is unannotated
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # A non-zero correction bias, so that routing really exercises it.
                buf.copy_(torch.randn_like(buf) * 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out
