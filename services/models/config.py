"""Model configuration read from a Hugging Face style `config.json`.

One frozen dataclass covers both supported families. Real checkpoints spell the same
field in more than one way (`num_experts` / `num_local_experts` / `n_routed_experts`,
`rope_theta` + `rope_scaling` / `rope_parameters`); `ModelConfig.from_dict` accepts them
all and fails with a message that names the file and the field when something is
missing or unsupported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from services.ep.moe_layers import moe_layer_ids
from services.models.quant import Fp8BlockQuant, QuantConfigError, parse_quant

Family = Literal["deepseek_v3", "qwen3_moe"]

ARCHITECTURES: dict[str, Family] = {
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


class ModelConfigError(ValueError):
    """A model directory or its config.json cannot be served."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (`default` or `yarn`)."""

    theta: float
    dim: int
    """Number of rotary dimensions per head."""
    kind: Literal["default", "yarn"] = "default"
    factor: float = 1.0
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    interleave: bool = False
    """DeepSeek lays rotary dims out in interleaved pairs."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine needs to know about a supported MoE checkpoint."""

    family: Family
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    # Dense MLP (DeepSeek's first layers, Qwen3's mlp_only_layers).
    intermediate_size: int
    # MoE.
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    moe_layers: tuple[int, ...]
    """Indices of layers whose MLP is a routed MoE block."""
    # DeepSeek-V3 (MLA + sigmoid group-limited routing + shared experts).
    n_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Qwen3-MoE (GQA).
    num_kv_heads: int = 0
    head_dim: int = 0
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    quant: Fp8BlockQuant | None = None
    """The checkpoint's weight quantization (None: plain bf16/fp16/fp32 weights)."""
    num_mtp_layers: int = 0
    """Multi-token-prediction layers stored past the decoder stack (`num_nextn_predict_layers`)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_mla(self) -> bool:
        return self.family == "deepseek_v3"

    @property
    def kv_entry_shape(self) -> tuple[int, ...]:
        """Shape of one token's KV in one layer: MLA keeps the latent + rope part, GQA keeps K and V."""
        if self.is_mla:
            return (self.kv_lora_rank + self.qk_rope_head_dim,)
        return (2, self.num_kv_heads, self.head_dim)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise ModelConfigError(f"model directory {model_dir} does not exist")
        if not path.is_file():
            raise ModelConfigError(f"model directory {model_dir} has no config.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path} is not valid JSON: {e}") from e
        cfg = cls.from_dict(raw, source=str(path))
        # generation_config.json may end a reply at more tokens (Kimi K2: its turn end, <|im_end|>).
        generation = Path(model_dir) / "generation_config.json"
        try:
            extra = (
                _ids(json.loads(generation.read_text()).get("eos_token_id")) if generation.is_file() else ()
            )
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ModelConfigError(
                f"{generation}: eos_token_id is not a token id or a list of them: {e}"
            ) from e
        return replace(cfg, eos_token_ids=tuple(dict.fromkeys((*cfg.eos_token_ids, *extra))))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        return _Parser(raw, source).parse()


def _ids(value: Any) -> tuple[int, ...]:
    """A token id or a list of them (`eos_token_id`) as a tuple; () when absent."""
    if value is None or value == ():
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


class _Parser:
    def __init__(self, raw: dict[str, Any], source: str):
        self.raw = raw
        self.source = source

    def fail(self, msg: str) -> ModelConfigError:
        return ModelConfigError(f"{self.source}: {msg}")

    def get(self, *names: str, default: Any = ...) -> Any:
        """First present spelling among `names`; `default` when absent (required if no default)."""
        for name in names:
            if self.raw.get(name) is not None:
                return self.raw[name]
        if default is ...:
            raise self.fail(f"missing required field {' / '.join(repr(n) for n in names)}")
        return default

    def parse(self) -> ModelConfig:
        archs = self.raw.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            supported = ", ".join(sorted(ARCHITECTURES))
            raise self.fail(
                f"unsupported architecture {archs or self.raw.get('model_type')!r} in field 'architectures'; "
                f"supported: {supported}"
            )
        try:
            quant = parse_quant(self.raw, self.source)
        except QuantConfigError as e:
            raise ModelConfigError(str(e)) from None
        family = ARCHITECTURES[arch]
        common = self.common(arch, family)
        common["quant"] = quant
        common["num_mtp_layers"] = int(self.get("num_nextn_predict_layers", default=0))
        if family == "deepseek_v3":
            return self.deepseek_v3(common)
        return self.qwen3_moe(common)

    def common(self, arch: str, family: Family) -> dict[str, Any]:
        eos_ids = _ids(self.get("eos_token_id", default=()))
        num_layers = int(self.get("num_hidden_layers"))
        return dict(
            family=family,
            architecture=arch,
            vocab_size=int(self.get("vocab_size")),
            hidden_size=int(self.get("hidden_size")),
            num_layers=num_layers,
            num_heads=int(self.get("num_attention_heads")),
            rms_norm_eps=float(self.get("rms_norm_eps", default=1e-6)),
            max_position_embeddings=int(self.get("max_position_embeddings")),
            intermediate_size=int(self.get("intermediate_size")),
            num_experts=int(self.get("n_routed_experts", "num_experts", "num_local_experts")),
            num_experts_per_tok=int(self.get("num_experts_per_tok")),
            moe_intermediate_size=int(self.get("moe_intermediate_size")),
            tie_word_embeddings=bool(self.get("tie_word_embeddings", default=False)),
            eos_token_ids=eos_ids,
            bos_token_id=self.get("bos_token_id", default=None),
            extra=self.raw,
        )

    def rope(self, dim: int, interleave: bool) -> RopeConfig:
        params = dict(self.get("rope_parameters", "rope_scaling", default={}) or {})
        theta = float(params.get("rope_theta") or self.get("rope_theta", default=10000.0))
        kind = params.get("rope_type") or params.get("type") or "default"
        if kind not in ("default", "yarn"):
            raise self.fail(f"unsupported rope type {kind!r} in 'rope_scaling'; supported: default, yarn")
        if kind == "default":
            return RopeConfig(theta=theta, dim=dim, interleave=interleave)
        orig: Any = params.get("original_max_position_embeddings") or self.raw.get("max_position_embeddings")
        factor = params.get("factor")
        if factor is None:
            factor = float(self.get("max_position_embeddings")) / float(orig)
        return RopeConfig(
            theta=theta,
            dim=dim,
            kind="yarn",
            factor=float(factor),
            original_max_position=int(orig),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
            interleave=interleave,
        )

    def deepseek_v3(self, c: dict[str, Any]) -> ModelConfig:
        scoring = self.raw.get("scoring_func", "sigmoid")
        topk_method = self.raw.get("topk_method", "noaux_tc")
        if scoring != "sigmoid" or topk_method != "noaux_tc":
            raise self.fail(
                f"DeepseekV3ForCausalLM with scoring_func={scoring!r}, topk_method={topk_method!r} is not "
                "supported; only sigmoid + noaux_tc routing (DeepSeek-V3/R1, Kimi K2)"
            )
        moe_layers = moe_layer_ids(self.raw)
        n_group = int(self.get("n_group", default=1))
        if c["num_experts"] % n_group:
            raise self.fail(f"n_routed_experts={c['num_experts']} is not divisible by n_group={n_group}")
        rope_dim = int(self.get("qk_rope_head_dim"))
        return ModelConfig(
            **c,
            rope=self.rope(rope_dim, interleave=bool(self.get("rope_interleave", default=True))),
            norm_topk_prob=bool(self.get("norm_topk_prob", default=True)),
            moe_layers=moe_layers,
            n_shared_experts=int(self.get("n_shared_experts", default=0)),
            n_group=n_group,
            topk_group=int(self.get("topk_group", default=1)),
            routed_scaling_factor=float(self.get("routed_scaling_factor", default=1.0)),
            q_lora_rank=self.get("q_lora_rank", default=None),
            kv_lora_rank=int(self.get("kv_lora_rank")),
            qk_nope_head_dim=int(self.get("qk_nope_head_dim")),
            qk_rope_head_dim=rope_dim,
            v_head_dim=int(self.get("v_head_dim")),
            attention_bias=bool(self.get("attention_bias", default=False)),
        )

    def qwen3_moe(self, c: dict[str, Any]) -> ModelConfig:
        if self.raw.get("use_sliding_window"):
            raise self.fail("use_sliding_window=true is not supported")
        moe_layers = moe_layer_ids(self.raw)
        head_dim = int(self.get("head_dim", default=c["hidden_size"] // c["num_heads"]))
        return ModelConfig(
            **c,
            rope=self.rope(head_dim, interleave=False),
            norm_topk_prob=bool(self.get("norm_topk_prob", default=False)),
            moe_layers=moe_layers,
            num_kv_heads=int(self.get("num_key_value_heads", default=c["num_heads"])),
            head_dim=head_dim,
            attention_bias=bool(self.get("attention_bias", default=False)),
        )
