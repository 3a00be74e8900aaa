"""Paged attention over a flat (varlen) token batch.

The runner packs the new tokens of every sequence in the batch into one flat tensor of T
tokens. Each layer first writes the new tokens' KV into their cache slots, then gathers
every sequence's whole context from the paged cache and runs masked SDPA on a padded
[B, Qmax, Kmax] view. All index tensors are built once per step (`AttnBatch`) and reused
by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttnBatch:
    """Per-step attention indices, shared by all layers."""

    slot_mapping: torch.Tensor
    """[T] cache slot of every new token."""
    q_index: torch.Tensor
    """[B, Qmax] index into the flat T tokens (padding points at token 0)."""
    kv_slots: torch.Tensor
    """[B, Kmax] cache slot of every context token (padding points at slot 0)."""
    mask: torch.Tensor
    """[B, 1, Qmax, Kmax] True where a query may attend a key (causal and valid)."""
    unpad_index: torch.Tensor
    """[T] index into the flattened [B*Qmax] padded queries, in flat-token order."""
    last_index: torch.Tensor
    """[B] flat index of each sequence's last new token (where logits are taken)."""
    decode: bool = False
    """A decode step: one new token per sequence, flat token i belongs to sequence i."""

    @classmethod
    def build_decode(
        cls, ctx_lens: list[int], block_tables: list[list[int]], page_size: int, device: torch.device | str
    ) -> AttnBatch:
        """A decode step: one new token per sequence, at position ctx_len - 1 (fewer ops than `build`)."""
        b, kmax = len(ctx_lens), max(ctx_lens)
        max_pages = -(-kmax // page_size)
        table = torch.tensor([t[:max_pages] + [0] * (max_pages - len(t[:max_pages])) for t in block_tables])
        ar_k = torch.arange(kmax)
        ctx_t = torch.tensor(ctx_lens)
        k_valid = ar_k[None, :] < ctx_t[:, None]  # [B, Kmax]
        kv_slots = (
            table.repeat_interleave(page_size, dim=1)[:, :kmax] * page_size + ar_k % page_size
        ) * k_valid
        last = [n - 1 for n in ctx_lens]
        slot_mapping = [
            t[p // page_size] * page_size + p % page_size for t, p in zip(block_tables, last, strict=True)
        ]
        rows = torch.arange(b, device=device)
        return cls(
            slot_mapping=torch.tensor(slot_mapping, device=device),
            q_index=rows[:, None],
            kv_slots=kv_slots.to(device),
            mask=k_valid[:, None, None, :].to(device),
            unpad_index=rows,
            last_index=rows,
            decode=True,
        )

    @classmethod
    def build(
        cls,
        q_lens: list[int],
        ctx_lens: list[int],
        block_tables: list[list[int]],
        page_size: int,
        device: torch.device | str = "cpu",
    ) -> AttnBatch:
        """q_lens: new tokens per sequence; ctx_lens: total tokens (cached + new) per sequence."""
        b = len(q_lens)
        qmax, kmax = max(q_lens), max(ctx_lens)
        q_lens_t = torch.tensor(q_lens, dtype=torch.long)
        ctx_t = torch.tensor(ctx_lens, dtype=torch.long)
        starts = torch.cumsum(q_lens_t, 0) - q_lens_t  # [B]

        ar_q = torch.arange(qmax)
        q_valid = ar_q[None, :] < q_lens_t[:, None]  # [B, Qmax]
        q_index = torch.where(q_valid, starts[:, None] + ar_q[None, :], torch.zeros(()).long())

        max_pages = max(len(t) for t in block_tables)
        table = torch.zeros(b, max_pages, dtype=torch.long)
        for i, pages in enumerate(block_tables):
            table[i, : len(pages)] = torch.tensor(pages, dtype=torch.long)
        ar_k = torch.arange(kmax)
        k_valid = ar_k[None, :] < ctx_t[:, None]  # [B, Kmax]
        page_of = torch.where(k_valid, ar_k[None, :] // page_size, torch.zeros(()).long())
        kv_slots = table.gather(1, page_of) * page_size + ar_k[None, :] % page_size
        kv_slots = torch.where(k_valid, kv_slots, torch.zeros(()).long())

        # Absolute position of each query: ctx_len - q_len + i. Padded queries see the whole context.
        q_pos = (ctx_t - q_lens_t)[:, None] + ar_q[None, :]  # [B, Qmax]
        mask = (ar_k[None, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]  # [B, Qmax, Kmax]

        flat_pos = (torch.arange(b)[:, None] * qmax + ar_q[None, :])[q_valid]  # [T]
        slot_mapping = kv_slots.gather(1, (q_pos.clamp(max=kmax - 1)))[q_valid]  # [T]
        last_index = starts + q_lens_t - 1
        to: dict[str, Any] = dict(device=device)
        return cls(
            slot_mapping=slot_mapping.to(**to),
            q_index=q_index.to(**to),
            kv_slots=kv_slots.to(**to),
            mask=mask.unsqueeze(1).to(**to),
            unpad_index=flat_pos.to(**to),
            last_index=last_index.to(**to),
        )


def write_cache(cache: torch.Tensor, batch: AttnBatch, entries: torch.Tensor) -> None:
    """Store the new tokens' KV entries [T, ...] in their slots of one layer's cache [S, ...]."""
    cache.index_copy_(0, batch.slot_mapping, entries.to(cache.dtype))


def gather_context(cache: torch.Tensor, batch: AttnBatch, dtype: torch.dtype) -> torch.Tensor:
    """Every sequence's context from one layer's cache [S, ...] -> [B, Kmax, ...] (padding: slot 0)."""
    b, k = batch.kv_slots.shape
    ctx = cache.index_select(0, batch.kv_slots.view(-1)).view(b, k, *cache.shape[1:])
    return ctx.to(dtype)


def padded_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttnBatch, scale: float
) -> torch.Tensor:
    """q: [T, H, Dqk] flat; k: [B, Kmax, Hkv, Dqk]; v: [B, Kmax, Hkv, Dv] -> [T, H, Dv] flat.

    Hkv may divide H (grouped-query attention): each KV head serves H / Hkv query heads.
    """
    h, dqk, dv = q.shape[1], q.shape[2], v.shape[-1]
    if dv < dqk:
        # MLA has Dv < Dqk; the fused SDPA kernels want one head dim, and zero columns add nothing.
        v = F.pad(v, (0, dqk - dv))
    b, qmax = batch.q_index.shape
    qp = q.index_select(0, batch.q_index.view(-1)).view(b, qmax, h, dqk).transpose(1, 2)  # [B, H, Qmax, Dqk]
    out = F.scaled_dot_product_attention(
        qp,
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=batch.mask,
        scale=scale,
        enable_gqa=k.shape[2] != h,
    )  # [B, H, Qmax, Dqk]
    out = out[..., :dv].transpose(1, 2).reshape(-1, h, dv)  # [B*Qmax, H, Dv]
    return out.index_select(0, batch.unpad_index)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttnBatch, scale: float
) -> torch.Tensor:
    """One query per sequence against G shared KV groups (MLA decode: one latent group for all heads).

    q: [B, G, R, Dqk] (R query heads per group); k: [B, G, K, Dqk]; v: [B, G, K, Dv] -> [B, G, R, Dv].
    For one group this beats SDPA on CPU; GQA goes through `padded_sdpa`.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float()  # [B, G, R, K]
    scores = scores.masked_fill_(~batch.mask, float("-inf")).mul_(scale)  # mask: [B, 1, 1, K]
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs if v.dtype == torch.float32 else probs.to(v.dtype), v)
