"""Dispatcher on `torch.distributed.all_to_all_single` (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from services.ep.dispatcher import Dispatched, Dispatcher, register


@register("torch")
class TorchAllToAll(Dispatcher):
    """Counts, rows and metadata exchanged with all_to_all_single; combine sums rows per token."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def _exchange(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        dist.all_to_all_single(recv, send, recv_counts, send_counts, group=self.group)
        return recv

    def dispatch(
        self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slots_per_rank: int
    ) -> Dispatched:
        t, k = slots.shape
        dest = slots // slots_per_rank  # [T, K] rank of each choice
        member = torch.zeros(self.size, t, dtype=torch.bool, device=x.device)
        member[dest.reshape(-1), torch.arange(t, device=x.device).repeat_interleave(k)] = True  # [W, T]
        send_rank, send_tok = member.nonzero(as_tuple=True)  # grouped by destination rank
        send_counts_t = member.sum(1)  # [W]
        recv_counts_t = torch.empty_like(send_counts_t)
        dist.all_to_all_single(recv_counts_t, send_counts_t, group=self.group)
        sc, rc = send_counts_t.tolist(), recv_counts_t.tolist()

        here = dest[send_tok] == send_rank[:, None]  # [N_send, K]
        local = torch.where(here, slots[send_tok] - send_rank[:, None] * slots_per_rank, -1)
        # Slot ids (small integers, exact in fp32) and weights travel together in one exchange.
        meta = torch.cat((local.float(), weights[send_tok].float()), dim=1)  # [N_send, 2K]
        recv_x = self._exchange(x[send_tok], sc, rc)
        recv_meta = self._exchange(meta, sc, rc)
        return Dispatched(recv_x, recv_meta[:, :k].long(), recv_meta[:, k:], (send_tok, sc, rc, t))

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        send_tok, sc, rc, t = handle
        back = self._exchange(y, rc, sc)  # rows return to where they came from
        out = y.new_zeros(t, y.shape[1])
        return out.index_add_(0, send_tok, back)

    def agree(self, flags: Sequence[bool]) -> list[bool]:
        v = torch.tensor([1 if f else 0 for f in flags])
        dist.all_reduce(v, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(x) for x in v.tolist()]
