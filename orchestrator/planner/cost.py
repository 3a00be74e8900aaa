"""The cost model: time of one step of a prefill or a decode rank in a wide-EP group.

Every rank runs data-parallel attention and holds the replicated weights (attention, dense MLPs,
shared experts, embeddings); routed experts are split over the group's `ep` ranks with redundant
slots. A step's time is the sum of its parts, each the larger of its compute time (FLOPs against
the GPU's dense peak at an efficiency) and its memory time (bytes against HBM bandwidth at an
efficiency), plus the dispatch/combine all-to-all of every MoE layer (FP8 dispatch, BF16
combine; bytes over the NIC for peers on other nodes and over NVLink within the node), which two
micro-batches hide behind computation up to `overlap`; with node-limited routing a token's copies
reach at most `group_limit` nodes. Expert load imbalance (EPLB's
balancedness: mean ÷ max rank load) slows the routed-expert GEMMs and the all-to-all, whose
slowest rank sets the pace.

The efficiencies are fitted once to the four published figures `calibration.py` checks (one set
for both publications and all GPUs); `docs/planner.md` gives the formulas and the fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.planner.specs import GpuSpec, ModelSpec

GB = 1e9
T = 1e12


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of peak (fitted; see docs/planner.md)."""

    gemm: float = 0.32
    """FP8 GEMMs of prefill-sized batches (weights and experts)."""
    attention_prefill: float = 0.36
    """Prefill attention core (MLA in its multi-head form, BF16)."""
    attention_decode: float = 0.54
    """Decode attention core (MLA with absorbed weights over the latent KV, BF16)."""
    hbm: float = 0.80
    """HBM streaming (weights and KV reads)."""
    network: float = 0.78
    """All-to-all bytes against NIC and NVLink bandwidth (DeepEP reaches ~0.8 of both)."""
    overlap_prefill: float = 1.0
    """Share of the all-to-all two micro-batches hide in prefill."""
    overlap_decode: float = 0.6
    """The same in decode (smaller batches leave less to hide behind)."""
    memory_fraction: float = 0.9
    """HBM the engine may use; the rest is the runtime's."""
    activation_gb: float = 4.0
    """Workspace kept free of weights and KV per rank."""


FITTED = Efficiency()


@dataclass(frozen=True)
class Precision:
    """What the KV cache and the routed experts are stored in; the rest stays FP8 weights and a
    BF16 attention core. Sources: NVIDIA's NVFP4 (4-bit values with one FP8 scale per 16:
    4.5 bits a weight); SGLang's and vLLM's `--kv-cache-dtype fp8_e4m3` (1 byte a value)."""

    kv_cache: str = "bf16"
    """bf16 or fp8."""
    experts: str = "fp8"
    """fp8 or fp4 (NVFP4): half the bytes, and the GPU's FP4 peak where it has one."""

    def __post_init__(self) -> None:
        if self.kv_cache not in ("bf16", "fp8") or self.experts not in ("fp8", "fp4"):
            raise ValueError(f"KV cache bf16|fp8 and experts fp8|fp4, not {self.kv_cache}/{self.experts}")

    @property
    def kv_scale(self) -> float:
        """KV bytes against BF16's (`ModelSpec.kv_bytes_per_token` counts BF16)."""
        return 0.5 if self.kv_cache == "fp8" else 1.0

    @property
    def expert_bytes(self) -> float:
        """Bytes of one routed-expert weight."""
        return 4.5 / 8 if self.experts == "fp4" else 1.0


@dataclass(frozen=True)
class Group:
    """One EP group of a role: `ep` ranks, `slots` routed-expert slots over them."""

    model: ModelSpec
    gpu: GpuSpec
    ep: int
    redundant: int = 32
    balancedness: float = 0.85
    eff: Efficiency = FITTED
    precision: Precision = Precision()

    @property
    def kv_bytes_per_token(self) -> float:
        return self.model.kv_bytes_per_token * self.precision.kv_scale

    @property
    def _expert_peak(self) -> float:
        """FLOP/s of the routed-expert GEMMs before efficiency: FP4's peak for FP4 experts on a GPU
        that has one, else FP8's (FP4 weights then only save memory)."""
        fp4 = self.precision.experts == "fp4" and self.gpu.fp4_tflops > 0
        return (self.gpu.fp4_tflops if fp4 else self.gpu.fp8_tflops) * T

    @property
    def slots_per_rank(self) -> int:
        return math.ceil((self.model.experts + self.redundant) / self.ep)

    @property
    def nodes(self) -> float:
        """NVLink domains the group spans: a node, or a whole NVL72 rack (`GpuSpec.domain`)."""
        return max(1.0, self.ep / self.gpu.domain)

    def weight_bytes(self) -> float:
        """Weights one rank holds: FP8, the routed experts in their own precision."""
        m = self.model
        experts = self.slots_per_rank * m.moe_layers * m.expert_params * self.precision.expert_bytes
        return m.replicated_params + experts

    def fits(self) -> bool:
        return self.kv_bytes_free() > 0

    def kv_bytes_free(self) -> float:
        usable = self.gpu.hbm_gb * GB * self.eff.memory_fraction - self.eff.activation_gb * GB
        return usable - self.weight_bytes()

    # ---- the all-to-all ------------------------------------------------------------------
    def _a2a_seconds_per_token(self, dedup_nodes: bool) -> float:
        """Dispatch + combine of one token over all MoE layers, on the busiest rank.

        Each of the token's top-k copies lands on a random rank: (ep - 1) / ep of them leave the
        GPU, and of those a share (nodes - 1) / nodes leaves the node. Prefill's normal kernels
        send a token once per remote node and fan out over NVLink (`dedup_nodes`); decode's
        low-latency kernels send every copy straight to its rank."""
        m, g = self.model, self.gpu
        per_copy = m.hidden * (1 + 2)  # FP8 dispatch + BF16 combine
        k, ep, nodes = m.top_k, self.ep, self.nodes
        remote_share = (nodes - 1) / nodes
        if dedup_nodes:
            distinct = nodes * (1 - (1 - 1 / nodes) ** k)  # expected nodes a token's copies reach
            if m.group_limit:  # node-limited routing: at most that many nodes
                distinct = min(distinct, m.group_limit)
            rdma = distinct * remote_share * per_copy
        else:
            rdma = k * remote_share * per_copy
        nvlink = k * (ep - 1) / ep * (1 - remote_share) * per_copy if not dedup_nodes else k * per_copy
        per_layer = max(rdma / (g.nic_gb_s * GB), nvlink / (g.nvlink_gb_s * GB)) / self.eff.network
        if ep == 1:
            per_layer = 0.0
        return per_layer * m.moe_layers / self.balancedness

    # ---- prefill -------------------------------------------------------------------------
    def prefill_seconds_per_token(self, context: float) -> float:
        """One new token through a prefill rank when batches are large, attending `context`
        tokens on average."""
        m, g, e = self.model, self.gpu, self.eff
        dense = m.linear_flops() / (g.fp8_tflops * T * e.gemm)
        routed = m.routed_flops() / (self._expert_peak * e.gemm) / self.balancedness
        attention = _prefill_attention_flops(m, context) / (g.bf16_tflops * T * e.attention_prefill)
        compute = dense + routed + attention
        comm = self._a2a_seconds_per_token(dedup_nodes=True)
        return max(compute, comm) + (1 - e.overlap_prefill) * min(compute, comm)

    def prefill_step_seconds(self, tokens_per_rank: float, context: float) -> float:
        """A prefill step of `tokens_per_rank` new tokens on every rank: streaming the rank's
        weights once, then the tokens."""
        stream = self.weight_bytes() / (self.gpu.hbm_tb_s * T * self.eff.hbm)
        return stream + tokens_per_rank * self.prefill_seconds_per_token(context)

    # ---- decode --------------------------------------------------------------------------
    def decode_step_seconds(self, batch: float, context: float) -> float:
        """One decode step of `batch` requests per rank, each attending `context` tokens."""
        m, g, e = self.model, self.gpu, self.eff
        hbm = g.hbm_tb_s * T * e.hbm
        replicated = max(m.replicated_params / hbm, batch * m.linear_flops() / (g.fp8_tflops * T * e.gemm))
        experts_bytes = (
            self.slots_per_rank * m.moe_layers * m.expert_params * self.precision.expert_bytes / hbm
        )
        experts_flops = batch * m.routed_flops() / (self._expert_peak * e.gemm) / self.balancedness
        experts = max(experts_bytes, experts_flops)
        kv_read = batch * context * self.kv_bytes_per_token / hbm
        attn = batch * m.attention_flops(context) / (g.bf16_tflops * T * e.attention_decode)
        compute = replicated + experts + kv_read + attn
        comm = batch * self._a2a_seconds_per_token(dedup_nodes=False)
        return max(compute, comm) + (1 - e.overlap_decode) * min(compute, comm)

    def decode_batch_limit(self, kv_tokens_per_request: float, cap: int = 256) -> int:
        """Requests per rank that fit: their whole KV (prompt + output) in the free HBM, and at
        most `cap` (the low-latency all-to-all's per-rank token buffer, SGLang's default graph)."""
        return max(
            0, min(cap, int(self.kv_bytes_free() // (kv_tokens_per_request * self.kv_bytes_per_token)))
        )


def _prefill_attention_flops(m: ModelSpec, context: float) -> float:
    """Prefill attention core for one new token over `context` tokens: MLA runs in its multi-head
    form (scores over the nope + rope dims, values over v_head_dim), GQA over head_dim."""
    per = m.heads * (m.qk_nope_dim + m.qk_rope_dim + m.v_head_dim) if m.mla else m.heads * 2 * m.head_dim
    return 2.0 * per * context * m.layers
