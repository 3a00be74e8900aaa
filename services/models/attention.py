"""Paged attention over a flat (varlen) token batch.

The runner packs the new tokens of every sequence in the batch into one flat tensor of T
tokens. Each layer first writes the new tokens' KV into their cache slots, then gathers
every sequence's whole context from the paged cache and runs masked SDPA on a padded
[B, Qmax, Kmax] view. All index tensors are built once per step (`AttnBatch`) and reused
by every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from services.models import device as devices


@dataclass(frozen=True)
class AttnBatch:
    """Per-step attention indices, shared by all layers (and the step's token ids and positions)."""

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
    positions: torch.Tensor
    """[T] absolute position of every new token."""
    tokens: torch.Tensor | None = None
    """[T] the new tokens' ids, when the builder was given them (copied with the indices)."""
    decode: bool = False
    """A decode step: one new token per sequence, flat token i belongs to sequence i."""

    @classmethod
    def build_decode(
        cls,
        ctx_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        page_size: int,
        device: torch.device | str,
        tokens: Sequence[int] | None = None,
    ) -> AttnBatch:
        """A decode step: one new token per sequence, at position ctx_len - 1 (fewer ops than `build`).

        Planned on the host, copied to `device` in one copy, expanded there."""
        b, kmax = len(ctx_lens), max(ctx_lens)
        table = _page_table(block_tables, -(-kmax // page_size))
        host = [np.asarray(ctx_lens), table]
        host += [np.asarray(tokens)] if tokens is not None else []
        ctx, pages, *ids = devices.to_device(host, device)
        ar_k = torch.arange(kmax, device=ctx.device)
        k_valid = ar_k[None, :] < ctx[:, None]  # [B, Kmax]
        kv_slots = (
            pages.gather(1, (ar_k // page_size).expand(b, kmax)) * page_size + ar_k % page_size
        ) * k_valid
        last = ctx - 1  # [B] each new token's position
        rows = torch.arange(b, device=ctx.device)
        return cls(
            slot_mapping=kv_slots.gather(1, last[:, None]).squeeze(1),
            q_index=rows[:, None],
            kv_slots=kv_slots,
            mask=k_valid[:, None, None, :],
            unpad_index=rows,
            last_index=rows,
            positions=last,
            tokens=ids[0] if ids else None,
            decode=True,
        )

    @classmethod
    def build(
        cls,
        q_lens: Sequence[int],
        ctx_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        page_size: int,
        device: torch.device | str = "cpu",
        tokens: Sequence[int] | None = None,
    ) -> AttnBatch:
        """q_lens: new tokens per sequence; ctx_lens: total tokens (cached + new) per sequence.

        The host plans which sequence and offset each new token has; the device derives every index
        from that with no data-dependent shape (nothing is read back)."""
        q = np.asarray(q_lens, dtype=np.int64)
        b, qmax, kmax, t = len(q_lens), max(q_lens), max(ctx_lens), int(q.sum())
        table = _page_table(block_tables, -(-kmax // page_size))
        seq = np.repeat(np.arange(b), q)  # [T] the sequence of each new token
        offset = np.arange(t) - np.repeat(np.cumsum(q) - q, q)  # [T] its place among its sequence's
        host = [q, np.asarray(ctx_lens), table, seq, offset] + (
            [np.asarray(tokens)] if tokens is not None else []
        )
        q_t, ctx, pages, seq_t, offset_t, *ids = devices.to_device(host, device)
        dev = q_t.device
        starts = torch.cumsum(q_t, 0) - q_t  # [B]
        ar_q, ar_k = torch.arange(qmax, device=dev), torch.arange(kmax, device=dev)
        q_valid = ar_q[None, :] < q_t[:, None]  # [B, Qmax]
        q_index = torch.where(q_valid, starts[:, None] + ar_q[None, :], 0)
        k_valid = ar_k[None, :] < ctx[:, None]  # [B, Kmax]
        kv_slots = pages.gather(1, (ar_k // page_size).expand(b, kmax)) * page_size + ar_k % page_size
        kv_slots = torch.where(k_valid, kv_slots, 0)
        # Absolute position of each query: ctx_len - q_len + i. Padded queries see the whole context.
        q_pos = (ctx - q_t)[:, None] + ar_q[None, :]  # [B, Qmax]
        mask = (ar_k[None, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]  # [B, Qmax, Kmax]
        positions = (ctx - q_t)[seq_t] + offset_t  # [T]
        return cls(
            slot_mapping=kv_slots[seq_t, positions],
            q_index=q_index,
            kv_slots=kv_slots,
            mask=mask.unsqueeze(1),
            unpad_index=seq_t * qmax + offset_t,
            last_index=starts + q_t - 1,
            positions=positions,
            tokens=ids[0] if ids else None,
        )


def _page_table(block_tables: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """[B, width] the first `width` pages of every sequence, padded with page 0."""
    table = np.zeros((len(block_tables), width), dtype=np.int64)
    for i, pages in enumerate(block_tables):
        n = min(len(pages), width)
        table[i, :n] = pages[:n]
    return table


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
