"""A contract double of DeepEP 2.1.0's `ElasticBuffer` dispatch and combine, normal and expanded.

A TEST DOUBLE, not DeepEP: it has the signatures, return tuples, handle and event semantics and
input checks of `deep_ep` 2.1.0 (github deepseek-ai/DeepEP at dd758ca) for the calls moeserve
makes, and moves the data with `torch.distributed.all_to_all_single` on whatever group it is
given (gloo on CPU here), so the `deepep` backend's calls run in every CI run. It does not
model performance, streams, FP8, cached handles or multi-level (scale-out) reduction. Each rule
names the upstream place it comes from:

- `deep_ep/buffers/elastic.py` `ElasticBuffer.dispatch` docstring: `x` is `[num_tokens, hidden]`
  bf16; `topk_idx` `[num_tokens, num_topk]` of `topk_idx_t`, -1 for no selection; returns
  `(recv_x, recv_topk_idx, recv_topk_weights, handle, EventOverlap)`; `do_cpu_sync` defaults to
  True; the per-call `num_max_tokens_per_rank` falls back to the constructor's, which sizes the
  buffer (so a call may not exceed it).
- `csrc/elastic/buffer.hpp` dispatch (lines ~750-790): `x` contiguous, row bytes % 16,
  `num_tokens <= num_max_tokens_per_rank`, `topk_idx` of `topk_idx_t` and contiguous, weights
  contiguous; (~1005-1110) with `do_cpu_sync` the outputs hold exactly the received rows,
  without it they are allocated for the worst case — `num_ranks * cap` tokens, and expanded
  `num_ranks * cap * min(num_topk, num_local_experts)` rows plus alignment — with unspecified
  contents past the real rows (the double fills them with NaN, so a caller that reads them
  fails); in expanded mode `recv_topk_idx` is None, `recv_topk_weights` is 1-D (one per row)
  and `handle.psum_num_recv_tokens_per_expert` holds each local expert's inclusive row end
  (int32), its rows starting at the previous end aligned up to `expert_alignment`;
  `handle.recv_src_metadata` is `[tokens, num_topk + 2]` int32: source token global index
  (`src_rank * cap + token`), then (from col 2) each choice's expanded row or -1.
  Combine (~1200-1240): `x` bf16 and contiguous, weights float; non-expanded `x` has one row
  per allocated received token.
- `deep_ep/include/deep_ep/impls/combine.cuh:109`: `kHidden % 256 == 0` (bf16, 32 lanes x int4).
- `deep_ep/utils/refs.py` `dispatch`: tokens sorted by source rank then token; a rank receives a
  token once if any of its experts is chosen; `recv_topk_idx` is local (-1 elsewhere);
  `num_experts % num_ranks == 0`. `combine`: the rows of a token are summed (expanded: all its
  rows on a rank, then over ranks); weights are not applied unless given, and expanded combine
  takes them only with `allow_multiple_reduction` (`tests/elastic/test_ep.py:227`), which the
  double does not model.
- `tests/elastic/test_ep.py:448-460`: per-expert counts; expanded count = end - aligned start.
- `deep_ep/utils/event.py` `EventOverlap.current_stream_wait`: asserts an event exists, which is
  false unless the call was made with `async_with_compute_stream=True`.
- One token's chosen experts are distinct and a rank with no tokens still joins each call with a
  padded token (SGLang's `token_dispatcher/deepep.py` does both for DeepEP's kernels).
"""

from __future__ import annotations

import threading

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
    """What combine needs, with the public fields of DeepEP's handle that callers read."""

    def __init__(self, do_expand, num_experts, expert_alignment, num_max_tokens_per_rank, topk_idx, **fields):
        self.do_expand = do_expand
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.topk_idx = topk_idx
        self.num_recv_tokens: int = fields["num_recv_tokens"]
        self.num_expanded_tokens: int = fields["num_expanded_tokens"]
        self.num_recv_tokens_per_expert_list: list[int] = fields["num_recv_tokens_per_expert_list"]
        self.psum_num_recv_tokens_per_scaleup_rank: torch.Tensor = fields["psum_per_rank"]
        self.psum_num_recv_tokens_per_expert: torch.Tensor = fields["psum_per_expert"]
        self.recv_src_metadata: torch.Tensor = fields["recv_src_metadata"]
        self._routes = fields["routes"]  # (send_index, send_counts, recv_counts): the double's own


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _padded(valid: torch.Tensor, rows: int, fill=float("nan")) -> torch.Tensor:
    """`valid` in the first rows of a `rows`-long tensor whose other rows are `fill`."""
    out = torch.full((rows, *valid.shape[1:]), fill, dtype=valid.dtype)
    out[: valid.shape[0]] = valid
    return out


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
        self.made_in = threading.current_thread().name
        """The thread that built the buffer (moeserve builds it at start-up, in the rank's main thread)."""
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
        assert handle is None, "the double models uncached dispatch only"
        assert not do_zero_padding or do_expand, "zero padding only makes sense with expand mode"
        assert isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16, (
            "x must be bfloat16 (or an FP8 tuple)"
        )
        num_tokens, hidden = x.shape
        cap = num_max_tokens_per_rank or self.num_max_tokens_per_rank
        align = expert_alignment or 1
        sync = True if do_cpu_sync is None else do_cpu_sync
        assert cap <= self.num_max_tokens_per_rank, "the buffer was sized for the constructor's cap"
        assert x.is_contiguous() and (hidden * x.element_size()) % 16 == 0
        assert hidden % 256 == 0, "combine.cuh: kHidden % (32 * sizeof(int4) / sizeof(bf16)) == 0"
        assert 0 < num_tokens <= cap, f"num_tokens {num_tokens} must be in (0, {cap}]"
        assert topk_idx is not None and topk_idx.shape[0] == num_tokens
        assert topk_idx.dtype == topk_idx_t and topk_idx.is_contiguous()
        assert topk_weights is None or (topk_weights.dtype == torch.float32 and topk_weights.is_contiguous())
        assert num_experts is not None and num_experts % self.num_ranks == 0
        for row in topk_idx.tolist():
            picked = [e for e in row if e >= 0]
            assert len(picked) == len(set(picked)), "one token's experts must be distinct"
        num_topk = topk_idx.shape[1]
        per_rank = num_experts // self.num_ranks

        # Move every token once to each rank holding one of its experts (refs.py `dispatch`).
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
        recv_src = self._exchange(index + self.rank_idx * cap, send_counts, recv_counts)
        first = self.rank_idx * per_rank
        local = (recv_idx >= first) & (recv_idx < first + per_rank)
        recv_idx = torch.where(local, recv_idx - first, torch.full_like(recv_idx, -1))

        n = recv_x.shape[0]
        counts = [int((recv_idx == e).sum()) for e in range(per_rank)]
        meta = torch.full((n, num_topk + 2), -1, dtype=torch.int32)
        meta[:, 0] = recv_src.to(torch.int32)
        if do_expand:
            # Rows grouped by local expert, each group's start aligned; a choice's row kept in meta.
            ends, row_of = [], torch.full_like(recv_idx, -1)
            end = 0
            for e in range(per_rank):
                tok, k = (recv_idx == e).nonzero(as_tuple=True)  # received-token order
                start = _align(end, align)
                row_of[tok, k] = torch.arange(start, start + tok.numel())
                end = start + tok.numel()
                ends.append(end)
            meta[:, 2:] = row_of.to(torch.int32)
            worst = self.num_ranks * cap * min(num_topk, per_rank) + (align - 1) * per_rank
            rows = _align(end, align) if sync else _align(worst, align)
            out_x = torch.full((rows, hidden), float("nan"), dtype=torch.bfloat16)
            out_w = torch.full((rows,), float("nan"))
            if do_zero_padding:
                out_x[:end] = 0
                out_w[:end] = 0
            chosen = row_of >= 0
            out_x[row_of[chosen]] = recv_x[chosen.nonzero(as_tuple=True)[0]]
            out_w[row_of[chosen]] = recv_w[chosen]
            recv_out, idx_out, w_out = out_x, None, out_w
            psum = torch.tensor(ends, dtype=torch.int32)
        else:
            rows = n if sync else self.num_ranks * cap
            recv_out = _padded(recv_x, rows)
            idx_out = _padded(recv_idx, rows, -1)
            w_out = _padded(recv_w, rows)
            aligned = torch.tensor([_align(c, align) for c in counts], dtype=torch.int32)
            psum = aligned.cumsum(0, dtype=torch.int32)
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats += torch.tensor(counts, dtype=torch.int32)
        handle = EPHandle(
            do_expand,
            num_experts,
            align,
            cap,
            topk_idx.clone() if do_handle_copy else topk_idx,
            num_recv_tokens=n if sync else -1,
            num_expanded_tokens=rows if do_expand else 0,
            num_recv_tokens_per_expert_list=[_align(c, align) for c in counts] if sync else [],
            psum_per_rank=torch.tensor(recv_counts, dtype=torch.int32).cumsum(0, dtype=torch.int32),
            psum_per_expert=psum,
            recv_src_metadata=meta if sync else _padded(meta, self.num_ranks * cap, -1),
            routes=(index, send_counts, recv_counts),
        )
        w_out = w_out if topk_weights is not None else None
        return recv_out, idx_out, w_out, handle, EventOverlap()

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
        index, send_counts, recv_counts = handle._routes
        n = sum(recv_counts)
        if handle.do_expand:
            assert topk_weights is None, "expanded combine takes weights only with allow_multiple_reduction"
            rows = handle.recv_src_metadata[:n, 2:].long()  # [n, K] expanded row per choice, -1 elsewhere
            assert rows.numel() == 0 or x.shape[0] > int(rows.max()), "one row per expanded slot"
            gathered = x[rows.clamp(min=0)].float() * (rows >= 0)[..., None]  # padding never read
            per_token = gathered.sum(1)
        else:
            assert x.shape[0] == handle.recv_src_metadata.shape[0], "one row per allocated received token"
            assert topk_weights is None, "the double does not model weighted combine"
            per_token = x[:n].float()
        back = self._exchange(per_token.to(torch.bfloat16), recv_counts, send_counts)
        out = torch.zeros(handle.topk_idx.shape[0], x.shape[1], dtype=torch.float32)
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
