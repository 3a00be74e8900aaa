"""The decoder stack both families share; each family supplies its attention module."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from services.ep import ExpertParallel
from services.models.attention import AttnBatch
from services.models.config import ModelConfig
from services.models.layers import DenseMLP, RMSNorm, RotaryEmbedding
from services.models.moe import MoEBlock

AttentionFactory = Callable[[ModelConfig, int], nn.Module]

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class DecoderLayer(nn.Module):
    """Attention + (dense MLP or MoE block), each behind an RMSNorm with a residual."""

    def __init__(
        self, cfg: ModelConfig, layer_idx: int, attention: AttentionFactory, parallel: ExpertParallel
    ):
        super().__init__()
        self.self_attn = attention(cfg, layer_idx)
        self.mlp: nn.Module = (
            MoEBlock(cfg, cfg.moe_layers.index(layer_idx), parallel)
            if layer_idx in cfg.moe_layers
            else DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: AttnBatch,
        cache: torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, batch, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: AttentionFactory, parallel: ExpertParallel):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, attention, parallel) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope)


class MoECausalLM(nn.Module):
    """A decoder-only MoE language model over a flat token batch and a paged KV cache.

    Parameter names follow the Hugging Face checkpoints, except that routed experts are stacked
    per layer (`experts.w13`, `experts.w2`); `load_weights` maps both on-disk layouts onto them.
    """

    def __init__(self, cfg: ModelConfig, attention: AttentionFactory, parallel: ExpertParallel | None = None):
        super().__init__()
        self.config = cfg
        self.parallel = parallel or ExpertParallel.single(len(cfg.moe_layers), cfg.num_experts)
        self.model = _Backbone(cfg, attention, self.parallel)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttnBatch,
        kv_caches: list[torch.Tensor],
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, D].

        `after_layer(i)` runs once layer i has written its KV (layer-wise KV hand-off hooks in here).
        """
        x = self.model.embed_tokens(input_ids)  # [T, D]
        rope = self.model.rotary(positions, x.dtype)
        for i, (layer, cache) in enumerate(zip(self.model.layers, kv_caches, strict=True)):
            x = layer(x, rope, batch, cache)
            if after_layer is not None:
                after_layer(i)
        return self.model.norm(x)

    def idle_forward(self) -> None:
        """Take part in every MoE layer's exchange with no tokens (a rank with no work in a step)."""
        x = self.model.embed_tokens.weight.new_empty(0, self.config.hidden_size)
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, D] -> fp32 logits [N, V]."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into the parameters; returns the names of parameters loaded."""
        params = dict(self.named_parameters())
        inter = self.config.moe_intermediate_size
        loaded: set[str] = set()
        partial: dict[str, int] = {}
        for name, tensor in weights:
            m = _LAYER.match(name)
            if m and int(m.group(1)) >= self.config.num_layers:
                continue  # multi-token-prediction layers sit past the decoder stack
            if name.endswith("rotary_emb.inv_freq"):
                continue
            em = _EXPERT.match(name)
            if em:
                prefix, expert, proj = em.group(1), int(em.group(2)), em.group(3)
                slots = self._slots(prefix, expert)
                if proj == "down_proj":
                    target, rows = f"{prefix}.w2", slice(None)
                else:
                    lo = 0 if proj == "gate_proj" else inter
                    target, rows = f"{prefix}.w13", slice(lo, lo + inter)
                for slot in slots:  # every local replica of this expert
                    _copy(params, target, lambda p, s=slot, r=rows: p[s, r], tensor, name)
                partial[target] = partial.get(target, 0) + 1
                if partial[target] == (2 if target.endswith("w13") else 1) * self.config.num_experts:
                    loaded.add(target)
                continue
            fused = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$", name)
            if fused:
                prefix = fused.group(1)
                target = f"{prefix}.w13" if fused.group(2) == "gate_up_proj" else f"{prefix}.w2"
                for expert in range(self.config.num_experts):
                    for slot in self._slots(prefix, expert):
                        _copy(params, target, lambda p, s=slot: p[s], tensor[expert], name)
                loaded.add(target)
                continue
            if name not in params:
                continue  # unexpected tensors (e.g. other heads) are ignored
            _copy(params, name, lambda p: p, tensor, name)
            loaded.add(name)
        if self.config.tie_word_embeddings and "lm_head.weight" not in loaded:
            self.lm_head.weight = self.model.embed_tokens.weight
            loaded.add("lm_head.weight")
        return loaded

    def _slots(self, experts_prefix: str, expert: int) -> list[int]:
        """Local slots replicating checkpoint expert `expert` of the layer named by `experts_prefix`."""
        moe_index = self.config.moe_layers.index(_layer_of(experts_prefix))
        return self.parallel.local_slots_of(moe_index, expert)


def _layer_of(prefix: str) -> int:
    return int(prefix.split(".")[2])


def _copy(params: dict[str, nn.Parameter], target: str, view, tensor: torch.Tensor, source: str) -> None:
    if target not in params:
        raise ValueError(f"checkpoint tensor {source} has no matching parameter {target}")
    dst = view(params[target].data)
    if tuple(dst.shape) != tuple(tensor.shape):
        raise ValueError(
            f"checkpoint tensor {source} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)} "
            "from config.json"
        )
    dst.copy_(tensor.to(dst.dtype))
