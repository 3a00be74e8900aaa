"""The decoder stack both families share; each family supplies its attention module."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from services.ep import ExpertParallel
from services.ep.slot_moves import switch
from services.models.attention import AttnBatch
from services.models.config import ModelConfig
from services.models.layers import DenseMLP, RMSNorm, RotaryEmbedding
from services.models.load_report import LoadReport
from services.models.moe import MoEBlock

AttentionFactory = Callable[[ModelConfig, int], nn.Module]


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
        return cast(torch.Tensor, x + self.mlp(self.post_attention_layernorm(x)))


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
    per layer (`experts.w13`, `experts.w2`); `weights.WeightMap` maps checkpoints onto them.
    """

    load_report: LoadReport | None = None
    """What the loader read and skipped (set by `load_model`)."""

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
        return cast(torch.Tensor, self.model.norm(x))

    def switch_placement(self) -> int:
        """Take the group's pending expert placement now (every rank at the same step): the changed
        slots' weights move, then the maps switch. Returns how many of this rank's slots changed."""
        par = self.parallel
        assert par.pending is not None
        blocks = [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoEBlock)]
        group = par.dispatcher.group if par.dispatcher is not None else None
        changed = switch(blocks, par.placement, par.pending, par.rank, group)
        par.take_pending()
        return changed

    def idle_forward(self) -> None:
        """Take part in every MoE layer's exchange with no tokens (a rank with no work in a step)."""
        x = self.model.embed_tokens.weight.new_empty(0, self.config.hidden_size)
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, D] -> fp32 logits [N, V]."""
        return cast(torch.Tensor, self.lm_head(hidden).float())
