"""The time of one step of a prefill or a decode rank in a group.

Under `ep` (the default) every rank runs data-parallel attention and holds the replicated weights
(attention, dense MLPs, shared experts, embeddings); routed experts are split over the group's `ep`
ranks with redundant slots. Each part of a step is a kernel class on a roofline: the larger of its
compute time (FLOPs against the GPU's dense peak at that class's efficiency) and its memory time
(bytes against HBM at `hbm`). The dispatch/combine all-to-all of every MoE layer (FP8 or NVFP4
dispatch, BF16 combine; over the NIC beyond the NVLink domain, over NVLink within, at most what the
copy kernels move) is hidden behind computation by two micro-batches up to `overlap`; with
node-limited routing a token's copies reach at most `group_limit` nodes. Expert load imbalance
(EPLB's balancedness: mean / max rank load) slows the routed-expert GEMMs and the all-to-all,
whose slowest rank sets the pace. `tp` and `dp` prefill (`Techniques.prefill_parallel`) replace
the all-to-all with NVLink collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from orchestrator.planner.cost import FITTED, GB, GIB, Efficiency, Precision, T, Techniques
from orchestrator.planner.specs import GpuSpec, ModelSpec

REFERENCE_RANKS, REFERENCE_SLOTS = 144, 2


@dataclass(frozen=True)
class Group:
    """One group of a role: `ep` ranks (the group's width), `slots` routed-expert slots over them."""

    model: ModelSpec
    gpu: GpuSpec
    ep: int
    redundant: int = 32
    balancedness: float = 0.77
    """EPLB's balancedness (mean / max rank load) of a reference group: 144 ranks of 2 slots each
    (DeepSeek's decode, what the EPLB bench measures); `balance` scales it to this group."""
    eff: Efficiency = FITTED
    precision: Precision = field(default_factory=Precision)
    techniques: Techniques = field(default_factory=Techniques)
    parallel: str = "ep"
    """ep, tp or dp (see `Techniques.prefill_parallel`); decode groups are ep."""

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
    def _attention_peak(self) -> float:
        g = self.gpu
        return (g.fp8_tflops if self.precision.attention == "fp8" else g.bf16_tflops) * T

    @property
    def balance(self) -> float:
        """This group's mean / max rank load. A rank's load is the sum of its slots' loads: with
        `n` slots a rank its spread shrinks as 1 / sqrt(n), and the busiest of `ep` ranks lies
        about sqrt(2 ln ep) spreads above the mean (the maximum of ep normal draws). Scaled from
        the reference group (144 ranks, 2 slots) that `balancedness` describes. Tensor-parallel
        MoE splits every expert over the ranks: balanced."""
        if self.parallel != "ep" or self.ep == 1:
            return 1.0
        spread = (
            (1 / self.balancedness - 1)
            * math.sqrt(REFERENCE_SLOTS)
            / math.sqrt(2 * math.log(REFERENCE_RANKS))
        )
        return 1 / (1 + spread * math.sqrt(2 * math.log(self.ep)) / math.sqrt(self.slots_per_rank))

    @property
    def slots_per_rank(self) -> int:
        return math.ceil((self.model.experts + self.redundant) / self.ep)

    @property
    def nodes(self) -> float:
        """NVLink domains the group spans: a node, or a whole NVL72 rack (`GpuSpec.domain`)."""
        return max(1.0, self.ep / self.gpu.domain)

    def weight_bytes(self) -> float:
        """Weights one rank holds in HBM: FP8, the routed experts in their own precision, less what
        is offloaded to host memory."""
        m = self.model
        expert = m.moe_layers * m.expert_params * self.precision.expert_bytes
        if self.parallel == "ep":
            held = m.replicated_params + self.slots_per_rank * expert
        elif self.parallel == "dp":  # attention replicated, every expert split over the group
            held = m.replicated_params + m.experts * expert / self.ep
        else:  # everything split over the group
            held = (m.replicated_params + m.experts * expert) / self.ep
        return max(0.0, held - self.techniques.offload_gb * GB)

    def fits(self) -> bool:
        return self.kv_bytes_free() > 0

    def kv_bytes_free(self) -> float:
        usable = self.gpu.hbm_gb * GIB * self.eff.memory_fraction - self.eff.activation_gb * GB
        return usable - self.weight_bytes()

    def _overlap(self, share: float) -> float:
        return share if self.techniques.two_batch_overlap else 0.0

    def _offload_seconds(self) -> float:
        """Streaming the offloaded weights in from host memory, every step."""
        return self.techniques.offload_gb * GB / (self.gpu.host_gb_s * GB * self.eff.host)

    # ---- communication ---------------------------------------------------------------------
    def _a2a_seconds_per_token(self, dedup_nodes: bool) -> float:
        """Dispatch + combine of one token over all MoE layers, on the busiest rank.

        Each of the token's top-k copies lands on a random rank: (ep - 1) / ep of them leave the
        GPU, and of those a share (nodes - 1) / nodes leaves the NVLink domain. Prefill's normal
        kernels send a token once per remote domain and fan out over NVLink (`dedup_nodes`);
        decode's low-latency kernels send every copy straight to its rank. A copy is the hidden
        state in the experts' input precision (FP8, or NVFP4 for FP4 experts) out and BF16 back."""
        m, g, e = self.model, self.gpu, self.eff
        if self.ep == 1:
            return 0.0
        per_copy = m.hidden * (self.precision.expert_bytes + 2)
        k, ep, nodes = m.top_k, self.ep, self.nodes
        remote_share = (nodes - 1) / nodes
        in_domain = min(ep, g.domain)
        if dedup_nodes:
            distinct = nodes * (1 - (1 - 1 / nodes) ** k)  # expected domains a token's copies reach
            if m.group_limit:  # node-limited routing: at most that many nodes
                distinct = min(distinct, m.group_limit)
            rdma = distinct * remote_share * per_copy
            nvlink = k * (in_domain - 1) / in_domain * per_copy
        else:
            rdma = k * remote_share * per_copy
            nvlink = k * (ep - 1) / ep * (1 - remote_share) * per_copy
        nvlink_rate = min(g.nvlink_gb_s * GB * e.network, e.a2a_nvlink_gb_s * GB)
        per_layer = max(rdma / (g.nic_gb_s * GB * e.network), nvlink / nvlink_rate)
        return per_layer * m.moe_layers / self.balance

    def _collective_seconds_per_token(self) -> float:
        """`tp`: two all-reduces of BF16 activations a layer (ring: 2 (w - 1) / w of the bytes, for
        each of the group's w tokens per rank-token); `dp`: an FP8 all-gather and a BF16
        reduce-scatter a MoE layer ((w - 1) copies of the token). Over NVLink."""
        m, w = self.model, self.ep
        if w == 1:
            return 0.0
        if self.parallel == "tp":
            per_token = m.layers * 2 * 2 * (w - 1) * m.hidden * 2
        else:
            per_token = m.moe_layers * (w - 1) * m.hidden * 3
        return per_token / (self.gpu.nvlink_gb_s * GB * self.eff.network)

    # ---- prefill ---------------------------------------------------------------------------
    def prefill_parts(self, context: float) -> dict[str, float]:
        """Seconds of one new token through a prefill rank (large batches), by part: `dense`,
        `routed`, `attention` (compute), `comm` (the all-to-all or the collectives) and `total`."""
        m, g, e = self.model, self.gpu, self.eff
        parts = {
            "dense": m.linear_flops() / (g.fp8_tflops * T * e.gemm),
            "routed": m.routed_flops() / (self._expert_peak * e.gemm) / self.balance,
            "attention": _prefill_attention_flops(m, context) / (self._attention_peak * e.attention),
        }
        compute = sum(parts.values())
        if self.parallel == "ep":
            parts["comm"] = self._a2a_seconds_per_token(dedup_nodes=True)
        else:
            parts["comm"] = self._collective_seconds_per_token()
        comm = parts["comm"]
        if self.parallel == "tp":  # the all-reduces sit between the layers' GEMMs: not hidden
            parts["total"] = compute + comm
        else:
            parts["total"] = max(compute, comm) + (1 - self._overlap(e.overlap_prefill)) * min(compute, comm)
        return parts

    def prefill_seconds_per_token(self, context: float) -> float:
        """One new token through a prefill rank when batches are large, attending `context`
        tokens on average."""
        return self.prefill_parts(context)["total"]

    def prefill_step_seconds(self, tokens_per_rank: float, context: float) -> float:
        """A prefill step of `tokens_per_rank` new tokens on every rank: streaming the rank's
        weights once, then the tokens; the offloaded weights come in from the host meanwhile (a
        layer is fetched while the one before computes), so the slower of the two sets the pace."""
        stream = self.weight_bytes() / (self.gpu.hbm_tb_s * T * self.eff.hbm)
        return max(
            stream + tokens_per_rank * self.prefill_seconds_per_token(context), self._offload_seconds()
        )

    # ---- decode ----------------------------------------------------------------------------
    def decode_step_seconds(self, batch: float, context: float) -> float:
        """One decode step of `batch` requests per rank, each attending `context` tokens: the
        main model verifies `1 + mtp_draft` tokens a request (weights and KV read once), and the
        MTP module drafts `mtp_draft` (one more layer each). Offloaded weights stream in meanwhile."""
        t = self.techniques
        step = self._forward_seconds(batch, context, 1 + t.mtp_draft)
        if t.mtp_draft:
            step += t.mtp_draft * self._forward_seconds(batch, context, 1) / self.model.layers
        return max(step, self._offload_seconds())

    def _forward_seconds(self, batch: float, context: float, tokens: int) -> float:
        return self.decode_parts(batch, context, tokens)["total"]

    def decode_parts(self, batch: float, context: float, tokens: int = 1) -> dict[str, float]:
        """Seconds of one forward of `batch` requests of `tokens` tokens each, by part: each a
        roofline (the larger of its bytes over HBM and its FLOPs over the peak): `replicated`
        weights, `experts`, `attention` (KV read or attention FLOPs); then `compute`, `comm` (the
        all-to-all) and `total`."""
        m, g, e = self.model, self.gpu, self.eff
        hbm = g.hbm_tb_s * T * e.hbm
        n = batch * tokens  # tokens through the weights this step
        expert_bytes = self.slots_per_rank * m.moe_layers * m.expert_params * self.precision.expert_bytes
        parts = {
            "replicated": max(m.replicated_params / hbm, n * m.linear_flops() / (g.fp8_tflops * T * e.gemm)),
            "experts": max(
                expert_bytes / hbm, n * m.routed_flops() / (self._expert_peak * e.gemm) / self.balance
            ),
            "attention": max(
                batch * context * self.kv_bytes_per_token / hbm,
                n * m.attention_flops(context) / (self._attention_peak * e.attention),
            ),
        }
        compute = parts["compute"] = sum(parts.values())
        comm = parts["comm"] = n * self._a2a_seconds_per_token(dedup_nodes=False)
        parts["total"] = max(compute, comm) + (1 - self._overlap(e.overlap_decode)) * min(compute, comm)
        return parts

    def decode_batch_limit(self, kv_tokens_per_request: float) -> int:
        """Requests per rank that fit: their whole KV (prompt + output) in the free HBM, and at
        most `Techniques.max_decode_batch`."""
        fit = int(self.kv_bytes_free() // (kv_tokens_per_request * self.kv_bytes_per_token))
        return max(0, min(self.techniques.max_decode_batch, fit))


def _prefill_attention_flops(m: ModelSpec, context: float) -> float:
    """Prefill attention core for one new token over `context` tokens: MLA runs in its multi-head
    form (scores over the nope + rope dims, values over v_head_dim), GQA over head_dim."""
    per = m.heads * (m.qk_nope_dim + m.qk_rope_dim + m.v_head_dim) if m.mla else m.heads * 2 * m.head_dim
    return 2.0 * per * context * m.layers
