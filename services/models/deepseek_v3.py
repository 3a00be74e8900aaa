"""DeepSeek-V3 family (DeepSeek-V3/R1, Kimi K2): multi-head latent attention over a latent KV cache.

The cache keeps, per token and layer, the normalised KV latent (kv_lora_rank) and the rotated
shared rope key (qk_rope_head_dim), as DeepSeek's own inference code does; keys and values are
expanded from the latent with `kv_b_proj` when attention runs.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from services.ep import ExpertParallel
from services.models.attention import AttnBatch, decode_attention, gather_context, padded_sdpa, write_cache
from services.models.base import MoECausalLM
from services.models.config import ModelConfig
from services.models.layers import RMSNorm, apply_rotary, yarn_softmax_scale


class MLAttention(nn.Module):
    """Multi-head latent attention: caches the compressed latent + rope key, absorbed for decode."""

    dequantized = ("kv_b_proj",)
    """Read as a raw matrix for the absorbed decode: never kept in FP8."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.h = cfg.num_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.lora = cfg.kv_lora_rank
        qk_dim = self.nope + self.rope_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, self.h * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.h * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            cfg.hidden_size, self.lora + self.rope_dim, bias=cfg.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(self.lora, 1e-6)
        self.kv_b_proj = nn.Linear(self.lora, self.h * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.h * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.interleave = cfg.rope.interleave
        self.scale = yarn_softmax_scale(cfg.rope, qk_dim)
        self.has_q_lora = cfg.q_lora_rank is not None

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: AttnBatch, cache: torch.Tensor
    ) -> torch.Tensor:
        """x: [T, D]; cache: [S, lora + rope] latent pages of this layer -> [T, D]."""
        t = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.has_q_lora else self.q_proj(x)
        q_nope, q_pe = q.view(t, self.h, self.nope + self.rope_dim).split([self.nope, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.lora, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [T, lora]
        # One rotation for the query heads and the shared key, as if the key were head H.
        pe = apply_rotary(
            torch.cat((q_pe, k_pe.unsqueeze(1)), dim=1), rope, self.interleave
        )  # [T, H+1, rope]
        q_pe, k_pe = pe[:, : self.h], pe[:, self.h]  # [T, H, rope], [T, rope]

        write_cache(cache, batch, torch.cat((latent, k_pe), dim=-1))
        ctx = gather_context(cache, batch, x.dtype)  # [B, K, lora+rope]
        attend = self._absorbed if batch.decode else self._expanded
        out = attend(q_nope, q_pe, ctx, batch)  # [T, H, v]
        return cast(torch.Tensor, self.o_proj(out.reshape(t, self.h * self.v_dim)))

    def _expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, ctx: torch.Tensor, batch: AttnBatch
    ) -> torch.Tensor:
        """Prefill: expand the context latents into per-head keys and values, then attend."""
        ctx_latent, ctx_pe = ctx.split([self.lora, self.rope_dim], dim=-1)  # type: ignore[no-untyped-call]  # torch's Tensor.split is unannotated
        b, k_len = ctx.shape[:2]
        kv = self.kv_b_proj(ctx_latent).view(b, k_len, self.h, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [B, K, H, nope], [B, K, H, v]
        k = torch.cat((k_nope, ctx_pe.unsqueeze(2).expand(b, k_len, self.h, self.rope_dim)), dim=-1)
        return padded_sdpa(torch.cat((q_nope, q_pe), dim=-1), k, v, batch, self.scale)

    def _absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, ctx: torch.Tensor, batch: AttnBatch
    ) -> torch.Tensor:
        """Decode: fold kv_b_proj into the query and the output, and attend over the latents directly."""
        w = self.kv_b_proj.weight.view(self.h, self.nope + self.v_dim, self.lora)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [H, nope, lora], [H, v, lora]
        q_latent = torch.matmul(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, lora]
        q_cat = torch.cat((q_latent, q_pe), dim=-1).unsqueeze(1)  # [B, 1, H, lora+rope]
        kv = ctx.unsqueeze(1)  # [B, 1, K, lora+rope]: one latent group shared by all heads
        o_latent = decode_attention(q_cat, kv, kv[..., : self.lora], batch, self.scale)  # [B, 1, H, lora]
        return torch.matmul(o_latent.squeeze(1).transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)


class DeepseekV3ForCausalLM(MoECausalLM):
    """DeepSeek-V3/R1 and Kimi K2: MLA attention, DeepSeekMoE with shared experts."""

    def __init__(self, cfg: ModelConfig, parallel: ExpertParallel | None = None):
        super().__init__(cfg, MLAttention, parallel)
