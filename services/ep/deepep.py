"""Dispatcher on DeepEP (CUDA GPUs; `deep_ep` is imported only when this backend is chosen).

Targets DeepEP 2.1.0 (github deepseek-ai/DeepEP at dd758ca): `ElasticBuffer` dispatch and combine.
Prefill steps use the normal (non-expanded) mode, whose contract is ours: each token reaches each
rank holding one of its top-k slots once, with local slot ids (-1 elsewhere) and weights, and
combine sums the rows that come back per token. Decode steps use the expanded layout
(`do_expand=True, do_cpu_sync=False`): one row per (token, local slot) grouped by slot in buffers
sized for the worst case, with the per-slot row ends (`handle.psum_num_recv_tokens_per_expert`,
inclusive, int32) left on the GPU for the grouped expert GEMM, so no MoE layer waits on the host
(the condition for CUDA graphs). `expert_alignment` stays 1: no gaps between slots' rows.

What DeepEP forbids is checked up front with an error naming the limit (`validate`): bf16 rows
only, hidden a multiple of 256 (its combine kernel), at most the per-rank cap of tokens per call
(the same on every rank: prefill and decode caps). Calls are synchronous, so the
returned `EventOverlap` carries no event and is not waited on. A rank without tokens still joins
each call with one padded token that selects nothing. For `deep_ep` < 2 the classic `Buffer`
normal mode is used.

Status: both modes are exercised in every CI run against the contract double in
`tests/doubles/deep_ep` (gloo on CPU); NOT yet run on GPU hardware.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from services.ep.dispatcher import Dispatched, Dispatcher, Expanded, register

MAX_TOKENS_PER_RANK = 4096
HIDDEN_ALIGNMENT = 256
"""DeepEP 2.1 combine: kHidden % (32 lanes x 8 bf16 per int4) == 0."""
V1_NVL_BUFFER_BYTES = 1 << 30


class DeepEPLimit(ValueError):
    """A shape or type DeepEP's kernels do not take; the message names the limit."""


@register("deepep")
class DeepEPDispatcher(Dispatcher):
    """DeepEP V2 `ElasticBuffer` (or V1 `Buffer` normal mode) dispatch and combine."""

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        max_tokens_per_rank: int = MAX_TOKENS_PER_RANK,
        expanded_decode: bool = True,
        decode_tokens_per_rank: int | None = None,
    ):
        """`max_tokens_per_rank`: DeepEP's per-rank token cap (the same on every rank; it sizes the
        buffer). `expanded_decode`: decode through the expanded layout (V2 only; False keeps normal
        mode). `decode_tokens_per_rank`: the cap of decode calls (at most `max_tokens_per_rank`, by
        default equal), which sizes their worst-case receive buffers: the engine's max_num_seqs.
        """
        try:
            import deep_ep
        except ImportError as e:
            raise RuntimeError(
                "dispatcher 'deepep' needs the deep_ep package and CUDA GPUs; use 'torch'"
            ) from e
        # The group's own NCCL communicator is null under lazy NCCL init; DeepEP must make its own
        # (SGLang sets the same).
        os.environ.setdefault("EP_REUSE_NCCL_COMM", "0")
        self._deep_ep = deep_ep
        self.group = group or dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.max_tokens_per_rank = max_tokens_per_rank
        self.decode_tokens_per_rank = min(decode_tokens_per_rank or max_tokens_per_rank, max_tokens_per_rank)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self._buffer: Any = None
        self._v2 = hasattr(deep_ep, "ElasticBuffer")
        self.expanded = self._v2 and expanded_decode

    def validate(self, hidden: int, dtype: str, num_slots: int) -> None:
        if dtype != "bfloat16":
            raise DeepEPLimit(
                f"DeepEP moves bfloat16 rows only; run the engine with dtype bfloat16, not {dtype}"
            )
        if hidden % HIDDEN_ALIGNMENT:
            raise DeepEPLimit(
                f"DeepEP's combine needs a hidden size that is a multiple of {HIDDEN_ALIGNMENT}; "
                f"this model's is {hidden}: use the torch dispatcher"
            )
        if num_slots % self.size:
            raise DeepEPLimit(
                f"DeepEP needs the {num_slots} expert slots to split evenly over {self.size} ranks"
            )

    def setup(self, hidden: int, topk: int) -> None:
        """DeepEP's buffer and its communicator, on this thread's current GPU (the rank's)."""
        if self._buffer is not None:
            return
        if self._v2:
            self._buffer = self._deep_ep.ElasticBuffer(
                self.group, num_max_tokens_per_rank=self.max_tokens_per_rank, hidden=hidden, num_topk=topk
            )
        else:
            self._buffer = self._deep_ep.Buffer(self.group, V1_NVL_BUFFER_BYTES, 0)

    def _buffer_for(self, hidden: int, topk: int) -> Any:
        if self._buffer is None:
            raise RuntimeError(
                "DeepEP's buffer is made at start-up (Dispatcher.setup, from ExpertParallel.prepare), "
                "on the rank's GPU; it was not"
            )
        return self._buffer

    def _prepare(
        self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slots_per_rank: int, cap: int
    ) -> tuple[Any, dict[str, Any], int]:
        """Check the limits, pad an empty rank; -> (buffer, DeepEP dispatch arguments, real tokens)."""
        num_tokens, hidden = x.shape
        self.validate(hidden, str(x.dtype).removeprefix("torch."), slots_per_rank * self.size)
        if num_tokens > cap:
            raise DeepEPLimit(
                f"{num_tokens} tokens in one step exceed DeepEP's per-rank cap of {cap}; "
                "lower max_prefill_tokens (prefill) or max_num_seqs (decode)"
            )
        if num_tokens == 0:  # DeepEP's kernels need every rank with at least one token
            x = x.new_zeros(1, hidden)
            slots = torch.full((1, slots.shape[1]), -1, dtype=slots.dtype, device=slots.device)
            weights = weights.new_zeros(1, slots.shape[1])
        args = dict(
            x=x.contiguous(),
            topk_idx=slots.to(self._deep_ep.topk_idx_t).contiguous(),
            topk_weights=weights.to(torch.float32).contiguous(),
            num_experts=slots_per_rank * self.size,  # DeepEP's "experts" are our physical slots
            num_max_tokens_per_rank=cap,
        )
        return self._buffer_for(hidden, slots.shape[1]), args, num_tokens

    def dispatch(
        self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slots_per_rank: int
    ) -> Dispatched:
        buf, args, num_tokens = self._prepare(x, slots, weights, slots_per_rank, self.max_tokens_per_rank)
        if self._v2:
            recv_x, recv_idx, recv_w, handle, _ = buf.dispatch(**args)
        else:
            per_rank, per_rdma_rank, per_expert, in_rank, _ = buf.get_dispatch_layout(
                args["topk_idx"], args["num_experts"]
            )
            recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
                args["x"],
                topk_idx=args["topk_idx"],
                topk_weights=args["topk_weights"],
                num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_rdma_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
            )
        # Synchronous calls: the returned EventOverlap has no event to wait on.
        return Dispatched(recv_x, recv_idx.long(), recv_w.float(), (handle, num_tokens))

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        handle, num_tokens = handle
        # Weighted expert outputs may have been promoted to fp32; DeepEP's combine takes bf16 rows.
        out: torch.Tensor
        out, _, _ = self._buffer.combine(y.to(torch.bfloat16).contiguous(), handle)  # V1 and V2 alike
        return out[:num_tokens]  # drop the padded token of an empty rank

    def dispatch_expanded(
        self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slots_per_rank: int
    ) -> Expanded:
        buf, args, num_tokens = self._prepare(x, slots, weights, slots_per_rank, self.decode_tokens_per_rank)
        # No CPU sync: buffers come back sized for the worst case, the row ends stay on the GPU.
        recv_x, _, recv_w, handle, _ = buf.dispatch(
            **args,
            expert_alignment=1,
            do_expand=True,
            do_cpu_sync=False,
        )
        return Expanded(recv_x, handle.psum_num_recv_tokens_per_expert, recv_w, (handle, num_tokens))

    def combine_expanded(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        return self.combine(y, handle)  # DeepEP tells the layouts apart by the handle

    def agree(self, flags: Sequence[bool]) -> list[bool]:
        v = torch.tensor([1 if f else 0 for f in flags], device=self.device)
        dist.all_reduce(v, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(x) for x in v.tolist()]
