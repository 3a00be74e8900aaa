"""Qwen3-MoE family (Qwen3-30B-A3B, Qwen3-235B-A22B): grouped-query attention with q/k norms."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from services.ep import ExpertParallel
from services.models.attention import AttnBatch, gather_context, padded_sdpa, write_cache
from services.models.base import MoECausalLM
from services.models.config import ModelConfig
from services.models.layers import RMSNorm, apply_rotary


class GQAttention(nn.Module):
    """Grouped-query attention with per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.h, self.kv_h, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_h * self.d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_h * self.d, bias=bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.scale = self.d**-0.5

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: AttnBatch, cache: torch.Tensor
    ) -> torch.Tensor:
        """x: [T, D]; cache: [S, 2, Hkv, d] K/V pages of this layer -> [T, D]."""
        t = x.shape[0]
        q = apply_rotary(self.q_norm(self.q_proj(x).view(t, self.h, self.d)), rope, False)  # [T, H, d]
        k = apply_rotary(self.k_norm(self.k_proj(x).view(t, self.kv_h, self.d)), rope, False)  # [T, Hkv, d]
        v = self.v_proj(x).view(t, self.kv_h, self.d)
        write_cache(cache, batch, torch.stack((k, v), dim=1))
        ctx = gather_context(cache, batch, x.dtype)  # [B, K, 2, Hkv, d]
        out = padded_sdpa(q, ctx[:, :, 0], ctx[:, :, 1], batch, self.scale)  # [T, H, d]
        return cast(torch.Tensor, self.o_proj(out.reshape(t, self.h * self.d)))


class Qwen3MoeForCausalLM(MoECausalLM):
    """Qwen3-MoE: GQA attention and softmax top-k routed experts."""

    def __init__(self, cfg: ModelConfig, parallel: ExpertParallel | None = None):
        super().__init__(cfg, GQAttention, parallel)
