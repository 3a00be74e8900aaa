"""Dispatcher on DeepEP (CUDA GPUs only; `deep_ep` is imported only when this backend is chosen).

DeepEP V2's `ElasticBuffer` serves prefill- and decode-sized batches through one dispatch/combine
pair whose contract is ours: each token reaches each rank holding one of its top-k slots once,
with local slot ids (-1 elsewhere) and weights, and combine sums the rows per token. With DeepEP
V1 (no `ElasticBuffer`) the classic `Buffer` normal mode is used for every batch; V1's
low-latency kernels, whose packed per-expert layout differs, are not used.

Status: written against DeepEP's documented Python API and NOT yet run on hardware — no GPU was
available to the sessions that built it. Its conformance test (tests/services/ep, marked `gpu`)
runs where DeepEP and two or more GPUs are present.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from services.ep.dispatcher import Dispatched, Dispatcher, register

MAX_TOKENS_PER_RANK = 4096
V1_NVL_BUFFER_BYTES = 1 << 30


@register("deepep")
class DeepEPDispatcher(Dispatcher):
    """DeepEP V2 `ElasticBuffer` (or V1 `Buffer` normal mode) dispatch and combine."""

    def __init__(
        self, group: dist.ProcessGroup | None = None, max_tokens_per_rank: int = MAX_TOKENS_PER_RANK
    ):
        try:
            import deep_ep
        except ImportError as e:
            raise RuntimeError(
                "dispatcher 'deepep' needs the deep_ep package and CUDA GPUs; use 'torch'"
            ) from e
        self._deep_ep = deep_ep
        self.group = group or dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.max_tokens_per_rank = max_tokens_per_rank
        self._buffer: Any = None
        self._v2 = hasattr(deep_ep, "ElasticBuffer")

    def _buffer_for(self, hidden: int, topk: int) -> Any:
        if self._v2:
            eb = self._deep_ep.ElasticBuffer
            need = eb.get_buffer_size_hint(self.group, self.max_tokens_per_rank, hidden, num_topk=topk)
            if self._buffer is None or self._buffer.num_bytes < need:
                self._buffer = eb(
                    self.group, num_max_tokens_per_rank=self.max_tokens_per_rank, hidden=hidden, num_topk=topk
                )
        elif self._buffer is None:
            self._buffer = self._deep_ep.Buffer(self.group, V1_NVL_BUFFER_BYTES, 0)
        return self._buffer

    def dispatch(
        self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slots_per_rank: int
    ) -> Dispatched:
        buf = self._buffer_for(x.shape[1], slots.shape[1])
        num_slots = slots_per_rank * self.size  # DeepEP's "experts" are our physical slots
        topk_idx, topk_w = slots.to(torch.int64), weights.to(torch.float32)
        if self._v2:
            recv_x, recv_idx, recv_w, handle, event = buf.dispatch(
                x,
                topk_idx=topk_idx,
                topk_weights=topk_w,
                num_experts=num_slots,
                num_max_tokens_per_rank=self.max_tokens_per_rank,
            )
        else:
            per_rank, per_rdma_rank, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_slots)
            recv_x, recv_idx, recv_w, _, handle, event = buf.dispatch(
                x,
                topk_idx=topk_idx,
                topk_weights=topk_w,
                num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_rdma_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
            )
        if event is not None:
            event.current_stream_wait()
        return Dispatched(recv_x, recv_idx.long(), recv_w.float(), handle)

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        if self._v2:
            out, _, event = self._buffer.combine(y, handle=handle)
        else:
            out, _, event = self._buffer.combine(y, handle)
        if event is not None:
            event.current_stream_wait()
        return out

    def agree(self, flags: Sequence[bool]) -> list[bool]:
        device = torch.device("cuda", torch.cuda.current_device())
        v = torch.tensor([1 if f else 0 for f in flags], device=device)
        dist.all_reduce(v, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(x) for x in v.tolist()]
