"""Mixture-of-experts: routers (gate -> top-k) and the routed experts' grouped matmuls.

Routers return `(topk_ids [T, K], topk_weights [T, K])` in logical expert ids. `RoutedExperts`
keeps every expert's weights stacked (`w13` = gate and up fused, `w2` = down) and computes the
weighted sum over each token's chosen experts, one matmul pair per expert that received tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.ep import Dispatched, Expanded, ExpertParallel
from services.models import fp8
from services.models.config import ModelConfig
from services.models.layers import DenseMLP


class SigmoidGroupLimitedRouter(nn.Module):
    """DeepSeek-V3 `noaux_tc` routing: sigmoid scores, bias-corrected choice within the top groups."""

    keeps_fp32 = True
    """Its parameters stay fp32 whatever the model's dtype (the loader keeps them so)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        # Routing stays in fp32 whatever the model dtype (as DeepSeek's reference does).
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, e = x.shape[0], self.weight.shape[0]
        scores = F.linear(x.float(), self.weight).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias  # [T, E]
        if self.n_group > 1:
            grouped = choice.view(t, self.n_group, e // self.n_group)  # [T, G, E/G]
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1)  # [T, G]
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            keep = keep.unsqueeze(-1).expand_as(grouped).reshape(t, e)
            choice = choice.masked_fill(~keep, float("-inf"))
        ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]  # [T, K]
        weights = scores.gather(1, ids)  # [T, K]
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


class SoftmaxTopKRouter(nn.Module):
    """Qwen3-MoE routing: softmax over all experts, top-k, optional renormalisation. Its gate is a
    linear layer in the model's dtype (as in transformers); the softmax runs in fp32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)  # [T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = probs.topk(self.top_k, dim=-1)  # [T, K]
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return ids, weights.to(logits.dtype)


def grouped_mm_supported(device: torch.device) -> bool:
    """Whether `F.grouped_mm` (one GEMM over all experts' token groups) runs on `device`."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return True


class RoutedExperts(nn.Module):
    """This rank's expert slots of one layer, weights stacked: w13 [S, 2I, D] (gate; up), w2 [S, D, I].

    Tokens are sorted by expert and multiplied in one grouped GEMM per projection
    (`F.grouped_mm` with per-expert offsets, which never reach the host); where the device has no
    grouped GEMM, one matmul pair per expert that received tokens (reading the group sizes).
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.use_grouped_mm: bool | None = None
        """None: decide from the device on first use."""
        self.fp8_native: bool | None = None
        """Set by `keep_fp8`: FP8 weights with block scales, cuBLAS (True) or reference (False) GEMMs."""

    def keep_fp8(self, native: bool) -> None:
        """Hold the weights in FP8 with their 128x128 block scales (`w13_scale_inv`, `w2_scale_inv`).

        On a GPU (`native`) each forward dequantizes this layer's slots into the activations' dtype
        and runs the grouped GEMM: no host sync, at the cost of a transient bf16 copy of the
        layer's expert weights (no grouped block-scaled FP8 GEMM is wired yet). Elsewhere each
        expert runs as two reference block-scaled GEMMs, one expert at a time.
        """
        s, two_i, d = self.w13.shape
        self.w13 = nn.Parameter(torch.empty(s, two_i, d, dtype=fp8.FP8), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(s, d, two_i // 2, dtype=fp8.FP8), requires_grad=False)
        self.w13_scale_inv = nn.Parameter(torch.empty(s, -(-two_i // fp8.BLOCK), -(-d // fp8.BLOCK)))
        self.w2_scale_inv = nn.Parameter(torch.empty(s, -(-d // fp8.BLOCK), -(-two_i // 2 // fp8.BLOCK)))
        self.fp8_native = native
        self.use_grouped_mm = None if native else False

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, all_local: bool = False
    ) -> torch.Tensor:
        """x: [T, D], ids/weights: [T, K] local slots (-1: computed elsewhere) -> [T, D] =
        sum over k with ids[t, k] >= 0 of weights[t, k] * slot_ids[t, k](x[t]).

        `all_local`: the caller knows there is no -1 (single-rank group), skip the masking. Entries
        computed elsewhere sort last and are left out of the groups, so no shape depends on them.
        """
        out = torch.zeros_like(x)
        if x.shape[0] == 0:
            return out
        if self.use_grouped_mm is None:
            self.use_grouped_mm = grouped_mm_supported(x.device)
        slots = self.w13.shape[0]
        flat_ids = ids.reshape(-1)  # [T*K]
        here = flat_ids >= 0
        key = flat_ids if all_local else torch.where(here, flat_ids, slots)  # elsewhere: after all slots
        order = torch.argsort(key, stable=True)  # [N] grouped by slot
        counts = torch.zeros(slots + 1, dtype=torch.long, device=x.device)
        counts = counts.index_add_(0, key, torch.ones_like(key))[:slots]  # [S] rows per slot
        token_of = order // ids.shape[1]  # [N] token of each sorted entry
        w_sorted = weights.reshape(-1)[order, None].to(x.dtype)  # [N, 1]
        xs = x.index_select(0, token_of)  # [N, D] sorted by slot
        if self.use_grouped_mm:
            y = self._grouped(xs, torch.cumsum(counts, 0, dtype=torch.int32))
        else:
            y = self._looped(xs, counts.tolist())
        if not all_local:  # rows past the last group are not computed: keep them out of the sum
            y = torch.where(here[order, None], y * w_sorted, 0.0)
            return out.index_add_(0, token_of, y)
        return out.index_add_(0, token_of, y * w_sorted)

    def grouped(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """xs: [N, D] rows grouped by slot; offsets: [S] int32 row ends -> [N, D] unweighted outputs.

        Rows at or past offsets[-1] are not computed from (their outputs are unspecified). With a
        grouped GEMM the sizes never reach the host; the per-expert fallback must read them.
        """
        if self.use_grouped_mm is None:
            self.use_grouped_mm = grouped_mm_supported(xs.device)
        if self.use_grouped_mm:
            return self._grouped(xs, offsets)
        ends = offsets.tolist()
        counts = [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]
        y = torch.zeros_like(xs)
        y[: ends[-1]] = self._looped(xs[: ends[-1]], counts)
        return y

    def _grouped(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """xs: [N, D] sorted by expert; offsets: [E] cumulative counts -> [N, D]."""
        w13: torch.Tensor = self.w13
        w2: torch.Tensor = self.w2
        if self.fp8_native is not None:  # FP8 kept: this layer's slots in the activations' dtype
            w13 = fp8.dequantize_stacked(w13, self.w13_scale_inv, xs.dtype)
            w2 = fp8.dequantize_stacked(w2, self.w2_scale_inv, xs.dtype)
        gate, up = F.grouped_mm(xs, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)  # [N, I] each
        return F.grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets)

    def _looped(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        y = torch.empty_like(xs)
        start = 0
        for expert, n in enumerate(counts):
            if n:
                y[start : start + n] = self._expert(expert, xs[start : start + n])
                start += n
        return y

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's SwiGLU on its rows x [n, D] -> [n, D]."""
        if self.fp8_native is None:
            gate, up = F.linear(x, self.w13[e]).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, self.w2[e])
        gate, up = fp8.block_scaled_mm(x, self.w13[e], self.w13_scale_inv[e], self.fp8_native).chunk(
            2, dim=-1
        )
        return fp8.block_scaled_mm(F.silu(gate) * up, self.w2[e], self.w2_scale_inv[e], self.fp8_native)


class MoEBlock(nn.Module):
    """Router + routed experts (+ DeepSeek's always-on shared experts), expert-parallel aware.

    The router picks logical experts; the placement turns them into physical slots; with more
    than one rank the dispatcher moves each token to the ranks holding its slots and brings the
    weighted partial outputs back.
    """

    def __init__(self, cfg: ModelConfig, moe_index: int, parallel: ExpertParallel):
        super().__init__()
        self.moe_index = moe_index
        self.parallel = parallel
        self.gate: nn.Module = (
            SigmoidGroupLimitedRouter(cfg) if cfg.family == "deepseek_v3" else SoftmaxTopKRouter(cfg)
        )
        self.experts = RoutedExperts(
            parallel.placement.slots_per_rank, cfg.hidden_size, cfg.moe_intermediate_size
        )
        self.shared_experts = (
            DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)  # [T, K] logical experts
        par = self.parallel
        if par.recorder is not None:
            par.recorder.record(self.moe_index, ids)
        slots = par.placement.route(self.moe_index, ids)  # [T, K] physical slots
        got: Expanded | Dispatched
        out: torch.Tensor
        if par.dispatcher is None:
            out = self.experts(x, slots, weights, all_local=True)  # one rank: every slot is local
        elif par.expanded:  # decode: rows already grouped by slot, sizes stay on the device
            got = par.dispatcher.dispatch_expanded(x, slots, weights, par.placement.slots_per_rank)
            y = self.experts.grouped(got.x, got.offsets) * got.weights[:, None].to(got.x.dtype)  # [R, D]
            out = par.dispatcher.combine_expanded(y, got.handle)
        else:
            got = par.dispatcher.dispatch(x, slots, weights, par.placement.slots_per_rank)
            partial = self.experts(got.x, got.local_slots, got.weights)
            out = par.dispatcher.combine(partial, got.handle)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
