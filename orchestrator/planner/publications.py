"""Published deployments the cost model is fitted on or checked against, as data.

Each `Row` is one published figure with the conditions its publication states: model, GPU, the
group's width and parallelism, lengths, precisions, techniques, and how it was measured:

- `served`: a production service under latency targets (DeepSeek's): the planner's own operating
  point (`plan.evaluate`) at those targets;
- `saturated`: one phase run at a stated per-GPU load, the other assumed unlimited (LMSYS's,
  vLLM's and RTP-LLM's benchmarks): prefill at `chunk` new tokens per GPU a step, decode at `batch`
  requests per GPU (the HBM limit, capped at `Techniques.max_decode_batch`, where unstated).

What a publication leaves unstated takes the planner's defaults (`Traffic`, `Techniques`), and
its `assumed` says which. Only publications with `fitted=True`, all on Hopper GPUs, set constants
(`fit.py`); the rest, every Blackwell one among them, are held-out checks (`bench/planner.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from orchestrator.planner.cost import FITTED, Efficiency, Precision, Techniques
from orchestrator.planner.group import Group
from orchestrator.planner.layout import Infeasible, Traffic
from orchestrator.planner.plan import MAX_CHUNK, decode_context, evaluate, prefill_context
from orchestrator.planner.specs import GPUS, MODELS

HOPPER = ("h800", "h100", "h200", "h20")
METRICS = ("input_per_node", "output_per_node", "input_per_gpu", "output_per_gpu")


@dataclass(frozen=True)
class Row:
    phase: str
    """prefill or decode."""
    metric: str
    """input_per_node (prompt tokens, cache hits included) or output_per_node, or per GPU."""
    published: float
    model: str
    gpu: str
    prefill_width: int
    decode_width: int
    traffic: Traffic
    measured: str = "saturated"
    chunk: int = MAX_CHUNK
    """Prefill: new tokens per GPU a step (saturated)."""
    batch: int | None = None
    """Decode: requests per GPU (saturated); None: as many as HBM holds, at most the cap."""
    redundant: int = 32
    label: str = ""

    def __post_init__(self) -> None:
        if self.phase not in ("prefill", "decode") or self.metric not in METRICS:
            raise ValueError(f"a row is a prefill or decode figure in one of {METRICS}, not {self}")
        if self.measured not in ("served", "saturated") or self.gpu not in GPUS or self.model not in MODELS:
            raise ValueError(f"a row is served or saturated, on a built-in GPU and model, not {self}")


@dataclass(frozen=True)
class Publication:
    key: str
    title: str
    url: str
    date: str
    fitted: bool
    rows: tuple[Row, ...]
    assumed: str = ""
    """The inputs the publication leaves unstated, and what the rows take for them."""
    notes: str = ""

    @property
    def hopper(self) -> bool:
        return all(r.gpu in HOPPER for r in self.rows)


def predict(row: Row, eff: Efficiency = FITTED) -> float:
    """The model's figure for `row`, in the row's unit."""
    model, gpu, t = MODELS[row.model], GPUS[row.gpu], row.traffic
    per = gpu.gpus_per_node if row.metric.endswith("per_node") else 1
    if row.measured == "served":
        layout = evaluate(model, gpu, t, row.prefill_width, row.decode_width, eff)
        per_node = (
            layout.input_tokens_per_s_per_node
            if row.phase == "prefill"
            else layout.output_tokens_per_s_per_node
        )
        return per_node / gpu.gpus_per_node * per
    prefill = row.phase == "prefill"
    g = Group(model, gpu, row.prefill_width if prefill else row.decode_width, row.redundant, t.balancedness,
              eff, t.precision, t.techniques, t.techniques.prefill_parallel if prefill else "ep")  # fmt: skip
    if not g.fits():
        raise Infeasible(f"{row.model} does not fit on {row.gpu} at {row.phase} width {g.ep}", "does_not_fit")
    if prefill:
        new_per_s = row.chunk / g.prefill_step_seconds(row.chunk, prefill_context(t))
        return new_per_s / (1 - t.cache_hit) * per
    batch = row.batch or g.decode_batch_limit(t.input_len + t.output_len)
    step = g.decode_step_seconds(batch, decode_context(t))
    return batch * t.techniques.tokens_per_step / step * per


def _half_the_experts_offloaded(model: str, width: int, experts: str) -> float:
    """GB per GPU when every other routed expert's weights stay in host memory (vLLM's published
    offload on GB200, "one of every two MoE GEMM weights")."""
    g = Group(MODELS[model], GPUS["gb200-nvl72"], width, redundant=0, precision=Precision(experts=experts))
    m = g.model
    return g.slots_per_rank * m.moe_layers * m.expert_params * g.precision.expert_bytes / 2 / 1e9


DS = Traffic(cache_hit=0.563, itl_ms=50)
SG = Traffic(input_len=2000, output_len=100, length_cv=0, cache_hit=0)
FP4 = Precision(kv_cache="fp8", experts="fp4", attention="fp8")
GB200_DECODE = Techniques(max_decode_batch=1408)

PUBLICATIONS: tuple[Publication, ...] = (
    Publication(
        "deepseek-day6", "DeepSeek-V3/R1 Inference System Overview (Open Source Week, day 6)",
        "https://github.com/deepseek-ai/open-infra-index/blob/main/202502OpenSourceWeek/"
        "day_6_one_more_thing_deepseekV3R1_inference_system_overview.md", "2025-03-01", True,
        (Row("prefill", "input_per_node", 73_700, "deepseek-v3", "h800", 32, 144, DS, "served"),
         Row("decode", "output_per_node", 14_800, "deepseek-v3", "h800", 32, 144, DS, "served")),
        assumed="lengths from the day's totals (608B input, 168B output, 4,989 KV tokens per output "
        "token: 4,384 and 1,211); ITL 50 ms from users' 20-22 tokens/s; cv 1, balancedness 0.77, "
        "TTFT 5 s, no MTP (none stated)",
        notes="a day's average of a production service, 56.3% of input tokens cache hits",
    ),
    Publication(
        "sglang-96-h100", "Deploying DeepSeek with PD Disaggregation and Large-scale Expert "
        "Parallelism on 96 H100 GPUs (LMSYS)", "https://lmsys.org/blog/2025-05-05-large-scale-ep/",
        "2025-05-05", True,
        (Row("prefill", "input_per_node", 57_674, "deepseek-v3", "h100", 32, 72,
             replace(SG, input_len=1000), label="1K inputs"),
         Row("prefill", "input_per_node", 54_543, "deepseek-v3", "h100", 32, 72, SG, label="2K inputs"),
         Row("prefill", "input_per_node", 50_302, "deepseek-v3", "h100", 32, 72,
             replace(SG, input_len=4096), label="4K inputs"),
         Row("decode", "output_per_node", 22_282, "deepseek-v3", "h100", 32, 72, SG, batch=256)),
        assumed="balancedness 0.77 (EPLB on the benchmark's own distribution)",
        notes="each phase measured alone on 4 (prefill, EP32) and 9 (decode, EP72) nodes; 16,384 "
        "tokens per GPU a prefill step, 256 requests per GPU in decode; fixed lengths",
    ),
    Publication(
        "rtp-llm-h800", "DeepSeek Replay Tech Report (Alibaba RTP-LLM)",
        "https://rtp-llm.ai/build/en/references/deepseek/reporter.html", "2025-05", False,
        (Row("prefill", "input_per_node", 42_600, "deepseek-v3", "h800", 32, 144,
             Traffic(input_len=4096, output_len=2048, length_cv=0, ttft_ms=1600, itl_ms=50), chunk=8192),
         Row("decode", "output_per_node", 14_700, "deepseek-v3", "h800", 32, 144,
             Traffic(input_len=4096, output_len=2048, length_cv=0, ttft_ms=1600, itl_ms=50), batch=92,
             redundant=16)),
        assumed="balancedness 0.77; no MTP (the report implements it but does not say the figures used it)",
        notes="RoCE; prefill two 4K requests per GPU in 1.5 s (TTFT 1.6 s); decode 13,200 requests "
        "on EP144 (128 + 16 redundant) at the 20 tokens/s-per-user limit",
    ),
    Publication(
        "sglang-kimi-k2-h200", "Deploying Kimi K2 with PD Disaggregation and Large-Scale Expert "
        "Parallelism on 128 H200 GPUs (LMSYS)", "https://lmsys.org/blog/2025-07-20-k2-large-scale-ep/",
        "2025-07-20", False,
        (Row("prefill", "input_per_node", 56_000, "kimi-k2", "h200", 32, 96, SG),
         Row("decode", "output_per_node", 24_000, "kimi-k2", "h200", 32, 96, SG, batch=480, redundant=96)),
        assumed="prefill 16,384 tokens per GPU a step (the series' setting); balancedness 0.77",
        notes="prefill 4 nodes (EP32), decode 12 nodes (EP96, 96 redundant experts, 480 requests "
        "per GPU); 2,000 input and 100 output tokens",
    ),
    Publication(
        "sglang-h20", "Together with SGLang: Best Practices for Serving DeepSeek-R1 on H20-96G (LMSYS, "
        "Ant Group)", "https://lmsys.org/blog/2025-09-26-sglang-ant-group/", "2025-09-26", False,
        (Row("prefill", "input_per_node", 16_500, "deepseek-r1", "h20", 8, 16,
             Traffic(input_len=4096, output_len=1, length_cv=0, precision=Precision("fp8", "fp8", "fp8"),
                     techniques=Techniques(prefill_parallel="tp"))),
         Row("decode", "output_per_node", 5_700, "deepseek-r1", "h20", 8, 16,
             Traffic(input_len=4096, output_len=1536, length_cv=0, precision=Precision("fp8", "fp8", "fp8"),
                     techniques=Techniques(mtp_draft=1, mtp_acceptance=0.85)), batch=48)),
        assumed="balancedness 0.77; MTP acceptance 0.85 for the reported accept length of 1.8-1.9",
        notes="prefill TP8 on one node; decode EP16 (DP attention) over 2 nodes at 48 requests per "
        "GPU, FP8 KV cache and FP8 MLA, MTP with one draft token",
    ),
    Publication(
        "sglang-gb200-1", "Deploying DeepSeek on GB200 NVL72 with PD and Large Scale EP (Part I) "
        "(LMSYS)", "https://lmsys.org/blog/2025-06-16-gb200-part-1/", "2025-06-16", False,
        (Row("decode", "output_per_gpu", 7_583, "deepseek-v3", "gb200-nvl72", 8, 48,
             replace(SG, techniques=Techniques(two_batch_overlap=False))),),
        assumed="decode batch the planner's default cap (256; the post gives it only in a chart); "
        "output 100 tokens as in the series; BF16 KV; balancedness 0.77",
        notes="decode EP48 (12 trays) in one NVL72 rack, 2,000-token inputs, FP8 experts, two-batch "
        "overlap off (the post: NVLink alone made it unneeded)",
    ),
    Publication(
        "sglang-gb200-2", "Deploying DeepSeek on GB200 NVL72 with PD and Large Scale EP (Part II) "
        "(LMSYS)", "https://lmsys.org/blog/2025-09-25-gb200-part-2/", "2025-09-25", False,
        (Row("prefill", "input_per_gpu", 26_156, "deepseek-v3", "gb200-nvl72", 2, 48,
             replace(SG, precision=FP4, techniques=Techniques(
                 offload_gb=_half_the_experts_offloaded("deepseek-v3", 2, "fp4"))), redundant=0,
             label="NVFP4 experts, FP8 KV and attention"),
         Row("decode", "output_per_gpu", 13_386, "deepseek-v3", "gb200-nvl72", 2, 48,
             replace(SG, precision=FP4, techniques=GB200_DECODE),
             label="NVFP4 experts, FP8 KV and attention"),
         Row("prefill", "input_per_gpu", 18_471, "deepseek-v3", "gb200-nvl72", 4, 48,
             replace(SG, techniques=Techniques(
                 offload_gb=_half_the_experts_offloaded("deepseek-v3", 4, "fp8"))), redundant=0,
             label="FP8 experts, BF16 KV and attention"),
         Row("decode", "output_per_gpu", 9_087, "deepseek-v3", "gb200-nvl72", 4, 48,
             replace(SG, techniques=GB200_DECODE), label="FP8 experts, BF16 KV and attention")),
        assumed="how much prefill offloads: every other expert's weights (vLLM's published scheme); "
        "decode batch as many as HBM holds, at most the stated 1,408; output 100 tokens; balancedness 0.77",
        notes="prefill 2 (NVFP4) or 4 (FP8) GPUs an instance with weights offloaded to Grace memory; "
        "decode EP48",
    ),
    Publication(
        "vllm-gb200", "Driving vLLM WideEP and Large-Scale Serving Toward Maturity on Blackwell "
        "(Part I)", "https://blog.vllm.ai/2026/02/03/dsr1-gb200-part1.html", "2026-02-03", False,
        (Row("prefill", "input_per_gpu", 26_200, "deepseek-r1", "gb200-nvl72", 2, 8,
             Traffic(input_len=2000, output_len=2000, length_cv=0, precision=Precision(experts="fp4"),
                     techniques=Techniques(offload_gb=_half_the_experts_offloaded("deepseek-r1", 2, "fp4"))),
             redundant=0),
         Row("decode", "output_per_gpu", 10_100, "deepseek-r1", "gb200-nvl72", 2, 8,
             Traffic(input_len=2000, output_len=2000, length_cv=0, precision=Precision(experts="fp4"),
                     techniques=Techniques(max_decode_batch=4096)))),
        assumed="BF16 KV and attention (not stated); decode batch as many as HBM holds; balancedness 0.77",
        notes="prefill 2 GPUs an instance (DP + EP) offloading one of every two MoE GEMM weights; decode "
        "8 GPUs (DP + EP); NVFP4 experts; 2K/2K",
    ),
)  # fmt: skip
