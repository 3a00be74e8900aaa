"""What the cost model knows of models and GPUs: built-in specs, each number with its public source,
and model specs read from a checkpoint's `config.json` (no torch: this runs in the orchestrator).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SpecError(ValueError):
    """A model or GPU the planner cannot describe; the message says why."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    dense_layers: int
    """Layers with a dense MLP (DeepSeek's first_k_dense_replace); the rest are MoE."""
    hidden: int
    vocab: int
    heads: int
    experts: int
    top_k: int
    shared_experts: int
    moe_intermediate: int
    dense_intermediate: int
    expert_groups: int = 1
    group_limit: int = 0
    """Groups (DeepSeek places one per node: node-limited routing) a token's experts may come
    from; 0: no limit."""
    # MLA (DeepSeek-V3, Kimi K2); kv_lora_rank 0 means grouped-query attention
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    # GQA (Qwen3)
    kv_heads: int = 0
    head_dim: int = 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def attention_params(self) -> int:
        """Weights of one layer's attention projections."""
        h = self.hidden
        if self.mla:
            qk = self.qk_nope_dim + self.qk_rope_dim
            q = (
                h * self.q_lora_rank + self.q_lora_rank * self.heads * qk
                if self.q_lora_rank
                else h * self.heads * qk
            )
            kv = h * (self.kv_lora_rank + self.qk_rope_dim)
            kv += self.kv_lora_rank * self.heads * (self.qk_nope_dim + self.v_head_dim)
            return q + kv + self.heads * self.v_head_dim * h
        return h * self.head_dim * (2 * self.heads + 2 * self.kv_heads)

    @property
    def expert_params(self) -> int:
        """Weights of one routed (or shared) expert: gate, up and down projections."""
        return 3 * self.hidden * self.moe_intermediate

    @property
    def replicated_params(self) -> int:
        """Weights every rank holds under DP attention: attention, dense MLPs, shared experts,
        embeddings and the LM head (routed experts are what EP splits)."""
        dense_mlp = self.dense_layers * 3 * self.hidden * self.dense_intermediate
        shared = self.moe_layers * self.shared_experts * self.expert_params
        return self.layers * self.attention_params + dense_mlp + shared + 2 * self.vocab * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes of one token over all layers (BF16: MLA's latent + rope key; GQA's K and V)."""
        per_layer = self.kv_lora_rank + self.qk_rope_dim if self.mla else 2 * self.kv_heads * self.head_dim
        return 2 * per_layer * self.layers

    def attention_flops(self, context: float) -> float:
        """FLOPs of one token's attention core (scores and weighted values) over `context` tokens,
        all layers. MLA as served (weights absorbed: scores over the latent + rope dims, values
        over the latent); GQA over the head dim."""
        if self.mla:
            per = self.heads * (2 * self.kv_lora_rank + self.qk_rope_dim)
        else:
            per = self.heads * 2 * self.head_dim
        return 2.0 * per * context * self.layers

    def linear_flops(self) -> float:
        """FLOPs of one token through every weight it touches (2 per weight), routed experts
        excluded (they are counted per rank); the LM head is counted."""
        return 2.0 * (self.replicated_params - self.vocab * self.hidden)

    def routed_flops(self) -> float:
        """FLOPs of one token through its top-k routed experts in every MoE layer."""
        return 2.0 * self.top_k * self.expert_params * self.moe_layers


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_gb: float
    hbm_tb_s: float
    fp8_tflops: float
    """Dense (no sparsity) tensor-core throughput."""
    bf16_tflops: float
    nvlink_gb_s: float
    """What a GPU sends to its node's peers, one direction."""
    nic_gb_s: float
    """What a GPU sends to other nodes (its share of the node's NICs), one direction."""
    gpus_per_node: int = 8
    """GPUs per node: the unit throughput per node is reported in."""
    fp4_tflops: float = 0.0
    """Dense FP4 tensor-core throughput (0: none; FP4 weights then compute at FP8)."""
    nvlink_domain: int = 0
    """GPUs one NVLink domain joins (0: the node). An NVL72 rack joins 72 GPUs over 18 trays of 4:
    traffic inside the domain goes over NVLink, beyond it over the NICs."""
    host_gb_s: float = 64.0
    """GB/s a GPU reads from host memory, one way: PCIe 5.0 x16 unless said (offloaded weights)."""
    source: str = ""
    """Where the figures come from."""

    @property
    def domain(self) -> int:
        return self.nvlink_domain or self.gpus_per_node


# Model configs: the checkpoints' own config.json files on Hugging Face.
MODELS: dict[str, ModelSpec] = {
    # huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json (R1 shares the architecture)
    "deepseek-v3": ModelSpec(
        "DeepSeek-V3", layers=61, dense_layers=3, hidden=7168, vocab=129280, heads=128, experts=256,
        top_k=8, shared_experts=1, moe_intermediate=2048, dense_intermediate=18432, expert_groups=8,
        group_limit=4, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128,
    ),
    # huggingface.co/moonshotai/Kimi-K2-Instruct/blob/main/config.json
    "kimi-k2": ModelSpec(
        "Kimi-K2", layers=61, dense_layers=1, hidden=7168, vocab=163840, heads=64, experts=384,
        top_k=8, shared_experts=1, moe_intermediate=2048, dense_intermediate=18432, expert_groups=1,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128,
    ),
    # huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json
    "qwen3-235b": ModelSpec(
        "Qwen3-235B-A22B", layers=94, dense_layers=0, hidden=4096, vocab=151936, heads=64, experts=128,
        top_k=8, shared_experts=0, moe_intermediate=1536, dense_intermediate=12288, kv_heads=4, head_dim=128,
    ),
}  # fmt: skip
MODELS["deepseek-r1"] = MODELS["deepseek-v3"]

# Datasheets: nvidia.com/en-us/data-center/h100 (H100 SXM: 80 GB, 3.35 TB/s, FP8 1,979 and BF16
# 989 dense TFLOPS — the sheet's figures are with sparsity, halved here —, NVLink 900 GB/s both
# directions: 450 one way), nvidia.com/en-us/data-center/h200 (141 GB, 4.8 TB/s, H100's compute),
# nvidia.com/en-us/data-center/dgx-b200 (8 GPUs: 1,440 GB, 64 TB/s, 72 PFLOPS FP8 training = 4.5
# dense per GPU, 144 PFLOPS FP4 inference = 9 dense per GPU, NVLink 5 1.8 TB/s both directions).
# H800: H100 compute and memory with NVLink cut to
# 400 GB/s; DeepSeek-V3 technical report (arXiv 2412.19437, section 3.2.2) measures 160 GB/s NVLink
# and 50 GB/s InfiniBand per GPU. NICs: one 400 Gb/s ConnectX-7 per GPU (DGX H100/B200 sheets and
# DeepSeek's H800 nodes) = 50 GB/s.
GPUS: dict[str, GpuSpec] = {
    "h800": GpuSpec("H800", 80, 3.35, 1979, 989, nvlink_gb_s=160, nic_gb_s=50),
    "h100": GpuSpec("H100", 80, 3.35, 1979, 989, nvlink_gb_s=450, nic_gb_s=50),
    "h200": GpuSpec("H200", 141, 4.8, 1979, 989, nvlink_gb_s=450, nic_gb_s=50),
    "b200": GpuSpec("B200", 180, 8.0, 4500, 2250, nvlink_gb_s=900, nic_gb_s=50, fp4_tflops=9000),
    # The rest: no vendor page was reachable offline, so third-party copies of the vendors' tables;
    # each `source` says where, and what was derived. Dense figures throughout (sparse ones halved).
    "h20": GpuSpec("H20", 96, 4.0, 296, 148, nvlink_gb_s=450, nic_gb_s=50, source=(
        "NVIDIA publishes no H20 datasheet; willitrunai.com/es/gpus/h20-96gb and "
        "zangshuxian.com/new/674733024499207168 (148 TFLOPS dense FP16); FP8 = its 296 INT8 TOPS; "
        "NIC assumed one 400G per GPU")),
    "b300": GpuSpec("B300", 270, 7.7, 4500, 2250, nvlink_gb_s=900, nic_gb_s=100, fp4_tflops=13500, source=(
        "nvidia.com/en-us/data-center/hgx (HGX B300: 2.1 TB, FP4 108 PF dense, FP8 72 and BF16 36 PF "
        "sparse, 1.8 TB/s NVLink, ConnectX-8 800G per GPU), per GPU = /8; glennklockwood.com/garden/"
        "processors/B300 (7.7 TB/s)")),
    "gb200-nvl72": GpuSpec("GB200 NVL72", 186, 8.0, 5000, 2500, nvlink_gb_s=900, nic_gb_s=50,
                           fp4_tflops=10000, gpus_per_node=4, nvlink_domain=72, host_gb_s=225, source=(
        "NVLink-C2C 900 GB/s both ways per Grace, shared by its 2 GPUs: 225 one way each; "
        "NVIDIA's GB200 NVL72 table (FP4 1,440, FP8 720, BF16 360 PF, sparse, per rack) / 72 / 2; "
        "zdszero.github.io (186 GB, 8 TB/s per GPU); MLCommons inference v6.1 Crusoe GB200 system "
        "(4 GPUs and 4 ConnectX-7 per tray)")),
    "gb300-nvl72": GpuSpec("GB300 NVL72", 279, 8.0, 5000, 2500, nvlink_gb_s=900, nic_gb_s=100,
                           fp4_tflops=15000, gpus_per_node=4, nvlink_domain=72, host_gb_s=225, source=(
        "NVLink-C2C as GB200's; vendordeep.com (GB300 NVL72: FP4 1,080 PF dense, FP8 720 PF sparse, "
        "ConnectX-8 800G per GPU) / 72; docs.nvidia.com NVL72 AI factory reference architecture "
        "(4 GPUs per tray)")),
    "mi300x": GpuSpec("MI300X", 192, 5.3, 2614.9, 1307.4, nvlink_gb_s=448, nic_gb_s=50, source=(
        "AMD's MI300X figures as copied in github.com/alpharomercoma/MI300X-vs-H200 (dense); Infinity "
        "Fabric 7 x 128 GB/s both ways (emergentmind.com), halved; NIC assumed one 400G per GPU")),
    "mi355x": GpuSpec("MI355X", 288, 8.0, 5000, 2500, nvlink_gb_s=537.6, nic_gb_s=50, fp4_tflops=10000,
                      source=(
        "AMD's MI355X table as copied (FP8 5.0, BF16 2.5, MXFP4 10 PF dense); rocm.docs.amd.com SGLang "
        "distributed guide (one 400G Pollara NIC per GPU); Infinity Fabric 7 x 153.6 GB/s both ways "
        "(humeconsulting.co), halved")),
}  # fmt: skip


def model_spec(name_or_dir: str) -> ModelSpec:
    """A built-in model (deepseek-v3, deepseek-r1, kimi-k2, qwen3-235b) or a checkpoint directory."""
    if name_or_dir in MODELS:
        return MODELS[name_or_dir]
    path = Path(name_or_dir)
    if not (path / "config.json").is_file():
        raise SpecError(
            f"unknown model {name_or_dir!r}: name one of {', '.join(sorted(MODELS))} "
            "or a directory with a config.json"
        )
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"cannot read {path / 'config.json'}: {e}") from None
    return from_config(raw, path.name)


def from_config(raw: dict[str, Any], name: str) -> ModelSpec:
    """A spec from a DeepSeek-V3-style (MLA) or Qwen3-MoE-style (GQA) config.json."""

    def get(*keys: str, default: Any = None) -> Any:
        for key in keys:
            if raw.get(key) is not None:
                return raw[key]
        if default is None:
            raise SpecError(f"{name}/config.json has no {' or '.join(keys)}")
        return default

    layers = int(get("num_hidden_layers"))
    experts = int(get("n_routed_experts", "num_experts", "num_local_experts"))
    common: dict[str, Any] = dict(
        name=name, layers=layers, hidden=int(get("hidden_size")), vocab=int(get("vocab_size")),
        heads=int(get("num_attention_heads")), experts=experts, top_k=int(get("num_experts_per_tok")),
        moe_intermediate=int(get("moe_intermediate_size")),
        dense_intermediate=int(get("intermediate_size", default=0)),
    )  # fmt: skip
    if get("kv_lora_rank", default=0):
        return ModelSpec(
            **common, dense_layers=int(get("first_k_dense_replace", default=0)),
            shared_experts=int(get("n_shared_experts", default=0)),
            expert_groups=int(get("n_group", default=1)),
            group_limit=int(get("topk_group", default=0)) if int(get("n_group", default=1)) > 1 else 0,
            q_lora_rank=int(get("q_lora_rank", default=0)), kv_lora_rank=int(get("kv_lora_rank")),
            qk_nope_dim=int(get("qk_nope_head_dim")), qk_rope_dim=int(get("qk_rope_head_dim")),
            v_head_dim=int(get("v_head_dim")),
        )  # fmt: skip
    heads = common["heads"]
    return ModelSpec(
        **common, dense_layers=len(get("mlp_only_layers", default=[])), shared_experts=0,
        kv_heads=int(get("num_key_value_heads", default=heads)),
        head_dim=int(get("head_dim", default=common["hidden"] // heads)),
    )  # fmt: skip


GPU_SPEC_FIELDS = {  # a `--gpu FILE.json`'s keys and types; all but OPTIONAL_GPU_FIELDS required
    "name": str, "hbm_gb": float, "hbm_tb_s": float, "fp8_tflops": float, "bf16_tflops": float,
    "nvlink_gb_s": float, "nic_gb_s": float, "gpus_per_node": int, "nvlink_domain": int, "source": str,
    "fp4_tflops": float, "host_gb_s": float,
}  # fmt: skip
OPTIONAL_GPU_FIELDS = {"gpus_per_node", "nvlink_domain", "source", "fp4_tflops", "host_gb_s"}


def gpu_spec(name: str) -> GpuSpec:
    """A built-in GPU (`GPUS`), or a JSON spec file (`GPU_SPEC_FIELDS`)."""
    if name in GPUS:
        return GPUS[name]
    path = Path(name)
    if not path.suffix == ".json":
        raise SpecError(f"unknown GPU {name!r}: name one of {', '.join(GPUS)}, or a .json spec file")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"cannot read the GPU spec {path}: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a GPU spec is a JSON object")
    unknown = set(raw) - set(GPU_SPEC_FIELDS)
    missing = set(GPU_SPEC_FIELDS) - OPTIONAL_GPU_FIELDS - set(raw)
    if unknown or missing:
        raise SpecError(f"{path}: unknown keys {sorted(unknown)}, missing {sorted(missing)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        kind = GPU_SPEC_FIELDS[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        ok = isinstance(value, str) if kind is str else number and value >= 0
        if not ok:
            raise SpecError(
                f"{path}: {key} must be {'text' if kind is str else 'a number >= 0'}, not {value!r}"
            )
        values[key] = kind(value)
    spec = GpuSpec(**values)
    if (
        min(spec.hbm_gb, spec.hbm_tb_s, spec.fp8_tflops, spec.nvlink_gb_s, spec.nic_gb_s, spec.gpus_per_node)
        <= 0
    ):
        raise SpecError(f"{path}: memory, bandwidths, FLOPs and gpus_per_node must be positive")
    return spec
