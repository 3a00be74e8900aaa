"""A contract double of DeepEP 2.1.0's `ElasticBuffer` (normal, non-expanded dispatch and combine).

A TEST DOUBLE, not DeepEP: it has the signatures, return tuples, handle and event semantics and
input checks of `deep_ep` 2.1.0 (github deepseek-ai/DeepEP at dd758ca) for the calls moeserve
makes, and moves the data with `torch.distributed.all_to_all_single` on whatever group it is
given (gloo on CPU here), so the `deepep` backend's calls run in every CI run. It does not
model performance, streams, FP8, the expanded layout or cached handles. Each rule names the
upstream place it comes from:

- `deep_ep/buffers/elastic.py` `ElasticBuffer.dispatch` docstring: `x` is `[num_tokens, hidden]`
  bf16; `topk_idx` `[num_tokens, num_topk]` of `topk_idx_t`, -1 for no selection; returns
  `(recv_x, recv_topk_idx, recv_topk_weights, handle, EventOverlap)`.
- `csrc/elastic/buffer.hpp` dispatch (lines ~750-790): `x` contiguous, row bytes % 16,
  `num_tokens <= num_max_tokens_per_rank`, `topk_idx` of `topk_idx_t` and contiguous, weights
  contiguous; combine (~1200-1240): `x` bf16 and contiguous, weights float.
- `deep_ep/include/deep_ep/impls/combine.cuh:109`: `kHidden % 256 == 0` (bf16, 32 lanes x int4).
- `deep_ep/utils/refs.py` `dispatch`: tokens sorted by source rank then token; a rank receives a
  token once if any of its experts is chosen; `recv_topk_idx` is local (-1 elsewhere);
  `num_experts % num_ranks == 0`. `combine` (non-expanded): each rank sends back one row per
  received token and the rows are summed per source token; weights are not applied.
- `deep_ep/utils/event.py` `EventOverlap.current_stream_wait`: asserts an event exists, which is
  false unless the call was made with `async_with_compute_stream=True`.
- One token's chosen experts are distinct and a rank with no tokens still joins each call with a
  padded token (SGLang's `token_dispatcher/deepep.py` does both for DeepEP's kernels).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__version__ = "2.1.0"
topk_idx_t = torch.int64


class EventOverlap:
    """`deep_ep.EventOverlap`: an event only exists for calls made asynchronously."""

    def __init__(self, event=None, extra_tensors=None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self, release_handle: bool = False) -> None:
        assert self.event is not None


class EPHandle:
    """What combine needs: where each received row came from, per source rank."""

    def __init__(self, num_experts: int, num_max_tokens_per_rank: int, topk_idx: torch.Tensor, routes):
        self.do_expand = False
        self.num_experts = num_experts
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.topk_idx = topk_idx
        self.routes = routes  # (send_index, send_counts, recv_counts, num_tokens): the double's own
        self.num_recv_tokens = sum(routes[2])


class ElasticBuffer:
    """`deep_ep.ElasticBuffer`, normal mode only (see the module docstring)."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_bytes: int | None = None,
        num_cpu_bytes: int = 0,
        num_max_tokens_per_rank: int = 0,
        hidden: int = 0,
        num_topk: int = 0,
        use_fp8_dispatch: bool = False,
        **configs,
    ):
        self.group = group
        self.rank_idx = group.rank()
        self.num_ranks = group.size()
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_bytes = num_bytes or self.get_buffer_size_hint(
            group, num_max_tokens_per_rank, hidden, num_topk
        )

    @staticmethod
    def get_buffer_size_hint(
        group: dist.ProcessGroup, num_max_tokens_per_rank: int, hidden: int, num_topk: int = 0, **kwargs
    ) -> int:
        assert num_max_tokens_per_rank > 0 and hidden > 0  # csrc/elastic/buffer.hpp:657
        per_token = hidden * 2 + num_topk * 12
        return -(-(num_max_tokens_per_rank * per_token * group.size()) // (2 << 20)) * (2 << 20)

    def dispatch(
        self,
        x,
        topk_idx=None,
        topk_weights=None,
        cumulative_local_expert_recv_stats=None,
        num_experts=None,
        num_max_tokens_per_rank=None,
        expert_alignment=None,
        num_sms: int = 0,
        num_qps: int = 0,
        previous_event=None,
        previous_event_before_epilogue=None,
        async_with_compute_stream: bool = False,
        allocate_on_comm_stream: bool = False,
        handle=None,
        do_handle_copy: bool = True,
        do_cpu_sync=None,
        do_expand: bool = False,
        do_zero_padding: bool = False,
        use_tma_aligned_col_major_sf: bool = False,
    ):
        assert handle is None and not do_expand, "the double models normal, uncached dispatch only"
        assert isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16, (
            "x must be bfloat16 (or an FP8 tuple)"
        )
        num_tokens, hidden = x.shape
        cap = num_max_tokens_per_rank or self.num_max_tokens_per_rank
        assert x.is_contiguous() and (hidden * x.element_size()) % 16 == 0
        assert hidden % 256 == 0, "combine.cuh: kHidden % (32 * sizeof(int4) / sizeof(bf16)) == 0"
        assert 0 < num_tokens <= cap, f"num_tokens {num_tokens} must be in (0, {cap}]"
        assert topk_idx is not None and topk_idx.shape[0] == num_tokens
        assert topk_idx.dtype == topk_idx_t and topk_idx.is_contiguous()
        assert topk_weights is None or (topk_weights.dtype == torch.float32 and topk_weights.is_contiguous())
        assert num_experts is not None and num_experts % self.num_ranks == 0
        chosen = topk_idx.masked_fill(topk_idx < 0, -1)
        for row in chosen.tolist():
            picked = [e for e in row if e >= 0]
            assert len(picked) == len(set(picked)), "one token's experts must be distinct"
        per_rank = num_experts // self.num_ranks
        send_index, send_counts = [], []
        for dst in range(self.num_ranks):
            mask = ((topk_idx >= dst * per_rank) & (topk_idx < (dst + 1) * per_rank)).any(dim=1)
            index = mask.nonzero(as_tuple=True)[0]
            send_index.append(index)
            send_counts.append(index.numel())
        index = torch.cat(send_index)
        recv_counts = self._exchange_counts(send_counts)
        recv_x = self._exchange(x[index], send_counts, recv_counts)
        recv_idx = self._exchange(topk_idx[index], send_counts, recv_counts)
        weights = topk_weights if topk_weights is not None else torch.zeros(topk_idx.shape)
        recv_w = self._exchange(weights[index], send_counts, recv_counts)
        first = self.rank_idx * per_rank
        local = (recv_idx >= first) & (recv_idx < first + per_rank)
        recv_idx = torch.where(local, recv_idx - first, torch.full_like(recv_idx, -1))
        handle = EPHandle(
            num_experts,
            cap,
            topk_idx.clone() if do_handle_copy else topk_idx,
            (index, send_counts, recv_counts, num_tokens),
        )
        return recv_x, recv_idx, recv_w if topk_weights is not None else None, handle, EventOverlap()

    def combine(
        self,
        x: torch.Tensor,
        handle: EPHandle,
        topk_weights=None,
        bias=None,
        num_sms: int = 0,
        num_qps: int = 0,
        previous_event=None,
        previous_event_before_epilogue=None,
        async_with_compute_stream: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        assert x.dtype == torch.bfloat16 and x.is_contiguous(), "combine takes contiguous bfloat16 rows"
        assert x.shape[1] % 256 == 0
        index, send_counts, recv_counts, num_tokens = handle.routes
        assert x.shape[0] == sum(recv_counts), "one row per received token"
        back = self._exchange(x, recv_counts, send_counts)
        out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32)
        out.index_add_(0, index, back.float())
        if bias is not None:
            for b in bias if isinstance(bias, tuple) else (bias,):
                out += b.float()
        return out.to(torch.bfloat16), None, EventOverlap()

    def _exchange_counts(self, send_counts: list[int]) -> list[int]:
        recv = torch.empty(self.num_ranks, dtype=torch.int64)
        dist.all_to_all_single(recv, torch.tensor(send_counts, dtype=torch.int64), group=self.group)
        return recv.tolist()

    def _exchange(self, t: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        wire = t.contiguous().view(torch.uint8) if t.dtype == torch.bfloat16 else t.contiguous()
        out = wire.new_empty((sum(recv_counts), *wire.shape[1:]))
        dist.all_to_all_single(out, wire, recv_counts, send_counts, group=self.group)
        return out.view(torch.bfloat16) if t.dtype == torch.bfloat16 else out
