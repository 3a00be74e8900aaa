"""Paged attention over a flat (varlen) token batch.

The runner packs the new tokens of every sequence in the batch into one flat tensor of T
tokens. Each layer first writes the new tokens' KV into their cache slots, then gathers
every sequence's whole context from the paged cache and runs masked SDPA on a padded
[B, Qmax, Kmax] view. All index tensors are built once per step (`AttnBatch`) and reused
by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        to = dict(device=device)
        return cls(
            slot_mapping=slot_mapping.to(**to),
            q_index=q_index.to(**to),
            kv_slots=kv_slots.to(**to),
            mask=mask.unsqueeze(1).to(**to),
            unpad_index=flat_pos.to(**to),
            last_index=last_index.to(**to),
        )


def padded_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttnBatch, scale: float
) -> torch.Tensor:
    """q: [T, H, Dqk] flat; k: [B, Kmax, H, Dqk]; v: [B, Kmax, H, Dv] -> [T, H, Dv] flat."""
    t, h, _ = q.shape
    qp = q[batch.q_index].transpose(1, 2)  # [B, H, Qmax, Dqk]
    out = F.scaled_dot_product_attention(
        qp, k.transpose(1, 2), v.transpose(1, 2), attn_mask=batch.mask, scale=scale
    )  # [B, H, Qmax, Dv]
    out = out.transpose(1, 2).reshape(-1, h, v.shape[-1])  # [B*Qmax, H, Dv]
    return out[batch.unpad_index]
