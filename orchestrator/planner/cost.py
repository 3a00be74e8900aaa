"""What the cost model is given besides the model and the GPU: the achieved fractions of peak
(`Efficiency`), the precisions (`Precision`) and the serving techniques (`Techniques`).

The efficiencies are physical: each is the share of one peak (dense tensor-core FLOPs, HBM,
NVLink or NIC bandwidth) one kind of kernel reaches, or the share of communication hidden. Three
are fitted, on Hopper publications only (`publications.py`, `fit.py`); the rest are set from
kernel measurements that their own projects publish. `group.py` uses them to time a step;
docs/planner.md gives the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GIB = 2**30
"""HBM capacities are binary: an "80 GB" H100 holds 80 GiB (nvidia-smi: 81,559 MiB)."""
T = 1e12


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of peak. `FITTED_FIELDS` are fitted by `fit.fit` on the Hopper
    publications; the others are set from the kernels' own published measurements."""

    overlap_prefill: float = 0.33
    """Share of prefill's all-to-all two micro-batches hide behind its compute (fitted; DeepSeek's
    overview says "hidden", its profile shows the combine partly exposed)."""
    attention: float = 0.34
    """Attention cores, prefill (MLA in multi-head form) and decode (absorbed MLA), against the
    BF16 (or FP8) dense peak (fitted). FlashMLA reports ~0.67 of H800's BF16 peak when compute-bound."""
    overlap_decode: float = 0.44
    """Share of decode's all-to-all two micro-batches hide behind its compute (fitted)."""
    gemm: float = 0.68
    """FP8 (or FP4) GEMMs, against the dense tensor-core peak (set: DeepGEMM's launch figure, 1,350+
    FP8 TFLOPS on H800 = 0.68 of 1,979)."""
    hbm: float = 0.80
    """HBM streaming (weights, KV reads), against the datasheet bandwidth (set: FlashMLA reaches
    3,000 of H800's 3,350 GB/s, 0.9, on its own; weight streaming in small GEMMs less)."""
    network: float = 0.78
    """All-to-all bytes against NIC and NVLink bandwidth (set: DeepEP's README measures 40-46 GB/s
    of a 50 GB/s NIC and ~153 of H800's 160 GB/s NVLink)."""
    a2a_nvlink_gb_s: float = 150.0
    """What the all-to-all kernels move over NVLink per GPU at most, whatever the link (set: they
    copy with a fixed share of the SMs; DeepEP's README measures 153-158 GB/s on H800, DeepEP issue
    #394 169 and 135 GB/s on GB200)."""
    host: float = 0.80
    """Offloaded weights streamed from host memory, against the host link (PCIe, NVLink-C2C) (set)."""
    memory_fraction: float = 0.9
    """HBM the engine may use; the rest is the runtime's (SGLang's --mem-fraction-static ~0.8-0.9)."""
    activation_gb: float = 4.0
    """Workspace kept free of weights and KV per rank."""


FITTED_FIELDS = ("overlap_prefill", "attention", "overlap_decode")
FITTED = Efficiency()
"""What `fit.fit` finds on the fitted (Hopper) rows of `publications.PUBLICATIONS`; a test refits."""


@dataclass(frozen=True)
class Precision:
    """What the KV cache, the routed experts and the attention core run in; the other weights stay
    FP8. Sources: NVIDIA's NVFP4 (4-bit values with one FP8 scale per 16: 4.5 bits a weight);
    SGLang's and vLLM's `--kv-cache-dtype fp8_e4m3` (1 byte a value); FP8 attention as in
    FlashMLA's and TensorRT-LLM's FP8 MLA kernels (the GPU's FP8 peak)."""

    kv_cache: str = "bf16"
    """bf16 or fp8."""
    experts: str = "fp8"
    """fp8 or fp4 (NVFP4): 4.5 bits a weight, and the GPU's FP4 peak where it has one."""
    attention: str = "bf16"
    """bf16 or fp8: the peak the attention cores run at."""

    def __post_init__(self) -> None:
        if (
            self.kv_cache not in ("bf16", "fp8")
            or self.experts not in ("fp8", "fp4")
            or self.attention not in ("bf16", "fp8")
        ):
            raise ValueError(
                f"KV cache bf16|fp8, experts fp8|fp4 and attention bf16|fp8, not "
                f"{self.kv_cache}/{self.experts}/{self.attention}"
            )

    @property
    def kv_scale(self) -> float:
        """KV bytes against BF16's (`ModelSpec.kv_bytes_per_token` counts BF16)."""
        return 0.5 if self.kv_cache == "fp8" else 1.0

    @property
    def expert_bytes(self) -> float:
        """Bytes of one routed-expert weight."""
        return 4.5 / 8 if self.experts == "fp4" else 1.0


PREFILL_PARALLEL = ("ep", "tp", "dp")


@dataclass(frozen=True)
class Techniques:
    """How the engine serves, beyond the layout's widths.

    - `prefill_parallel`: `ep` (data-parallel attention, expert-parallel MoE with the all-to-all:
      DeepSeek's and SGLang's), `tp` (the whole model tensor-parallel over the group: two
      all-reduces a layer over NVLink) or `dp` (data-parallel attention, tensor-parallel MoE: an
      all-gather and a reduce-scatter a MoE layer over NVLink). `tp` and `dp` groups stay inside
      one NVLink domain.
    - `mtp_draft`, `mtp_acceptance`: multi-token prediction (DeepSeek's MTP module as a draft
      model): each decode step verifies `1 + draft` tokens a request and emits `1 + a + ... + a^draft`
      on average, at acceptance `a` per drafted token (DeepSeek reports 0.85-0.90 for one draft).
    - `offload_gb`: weights per prefill GPU kept in host memory and streamed in over the host link
      every step, while the step computes (SGLang's and vLLM's prefill offload on GB200): a
      narrower prefill group holds the model. Decode groups never offload: their steps are too
      short to stream gigabytes.
    - `max_decode_batch`: requests a decode GPU runs at once at most (the engine's largest CUDA
      graph and the low-latency all-to-all's buffer; SGLang's largest default graph is 256).
    - `two_batch_overlap`: two micro-batches hide the all-to-all behind compute (SGLang's
      --enable-two-batch-overlap, DeepSeek's design); off, every byte waits.
    """

    prefill_parallel: str = "ep"
    mtp_draft: int = 0
    mtp_acceptance: float = 0.0
    offload_gb: float = 0.0
    max_decode_batch: int = 256
    two_batch_overlap: bool = True

    def __post_init__(self) -> None:
        if self.prefill_parallel not in PREFILL_PARALLEL:
            raise ValueError(f"prefill parallelism is ep, tp or dp, not {self.prefill_parallel!r}")
        if not (0 <= self.mtp_draft <= 8 and 0 <= self.mtp_acceptance <= 1):
            raise ValueError("MTP drafts 0-8 tokens a step with an acceptance rate between 0 and 1")
        if self.mtp_draft == 0 and self.mtp_acceptance > 0:
            raise ValueError("an MTP acceptance rate needs drafted tokens (--mtp-draft N)")
        if self.offload_gb < 0 or self.max_decode_batch < 1:
            raise ValueError("offload is >= 0 GB and the decode batch cap >= 1")

    @property
    def tokens_per_step(self) -> float:
        """Output tokens a request gains per decode step: 1 + a + a^2 + ... + a^draft."""
        return sum(self.mtp_acceptance**k for k in range(self.mtp_draft + 1))
