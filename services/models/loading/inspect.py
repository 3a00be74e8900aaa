"""How big a model is and what one rank of an EP group must hold: `moeserve inspect-model`.

Built from config.json alone (the model on the meta device, no weight read): parameters total
and active per token, and per rank of an EP-W group the dense weights (attention, dense MLPs,
shared experts, routers, embeddings: every rank holds them under data-parallel attention), its
share of the routed experts' slots, and the KV cache of N tokens; then whether that fits a
device, and the smallest EP width that does. The checkpoint's own size on disk (MTP layers and
FP8 scales included) is read from the safetensors headers when present.

FP8 checkpoints are priced as the loader keeps them on a GPU (`--fp8 keep`, the default there):
one byte per weight of the linear layers and routed experts the block-scaled GEMM takes, plus
their fp32 128x128 block scales; `fp8=False` prices everything at the dtype. An EP width that
does not divide the experts gets the fewest slots that split over it (DeepSeek-V3 at EP144: 288,
256 experts and 32 redundant), as a deployment would have to.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.models.config import ModelConfig

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 1 << 10, "MIB": 1 << 20}
_UNITS |= {"GIB": 1 << 30, "TIB": 1 << 40}


def parse_bytes(text: str) -> int:
    """'80GiB', '141GB', '1.5TB', '1024' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 80GiB or 141GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of a model (routed experts apart: they are what EP splits)."""

    architecture: str
    layers: int
    moe_layers: int
    experts: int
    experts_per_token: int
    dense_params: int
    routed_params: int
    kv_bytes_per_token_per_dtype_byte: int
    """KV elements per token over all layers (times the dtype's bytes = bytes per token)."""
    fp8_dense_params: int = 0
    """Dense weights an FP8 checkpoint keeps in FP8 (linear layers the block-scaled GEMM takes)."""
    fp8_dense_scales: int = 0
    """Their fp32 block scales."""
    fp8_experts: bool = False
    """The routed experts stay in FP8 (their sizes are multiples of the 128 blocks)."""
    expert_scales: int = 0
    """The routed experts' fp32 block scales, all experts."""

    @property
    def total_params(self) -> int:
        return self.dense_params + self.routed_params

    @property
    def active_params(self) -> int:
        return self.dense_params + self.routed_params * self.experts_per_token // self.experts

    @classmethod
    def of(cls, cfg: ModelConfig) -> ModelSize:
        from torch import nn

        from services.ep import ExpertParallel
        from services.models import fp8
        from services.models.loading.loader import build_on_meta

        model = build_on_meta(cfg, ExpertParallel.single(len(cfg.moe_layers), cfg.num_experts))
        routed = dense = fp8_dense = fp8_scales = expert_scales = 0
        for name, p in model.named_parameters():
            if name.endswith((".experts.w13", ".experts.w2")):
                routed += p.numel()
                expert_scales += p.shape[0] * _blocks(p.shape[1], p.shape[2])
            else:
                dense += p.numel()
        if cfg.quant is not None:  # what the loader keeps in FP8 (`loader._keep_fp8`)
            for parent in model.model.layers.modules():
                raw = getattr(parent, "dequantized", ())
                for child_name, child in parent.named_children():
                    if not isinstance(child, nn.Linear) or child_name in raw:
                        continue
                    if fp8.eligible(child.out_features, child.in_features):
                        fp8_dense += child.weight.numel()
                        fp8_scales += _blocks(child.out_features, child.in_features)
        aligned = cfg.hidden_size % fp8.BLOCK == 0 and cfg.moe_intermediate_size % fp8.BLOCK == 0
        return cls(
            architecture=cfg.architecture,
            layers=cfg.num_layers,
            moe_layers=len(cfg.moe_layers),
            experts=cfg.num_experts,
            experts_per_token=cfg.num_experts_per_tok,
            dense_params=dense,
            routed_params=routed,
            kv_bytes_per_token_per_dtype_byte=cfg.num_layers * math.prod(cfg.kv_entry_shape),
            fp8_dense_params=fp8_dense,
            fp8_dense_scales=fp8_scales,
            fp8_experts=cfg.quant is not None and aligned,
            expert_scales=expert_scales if cfg.quant is not None and aligned else 0,
        )


def _blocks(rows: int, cols: int) -> int:
    """128x128 scale blocks of a [rows, cols] weight (partial edge blocks count)."""
    return -(-rows // 128) * -(-cols // 128)


def slots_for(experts: int, ep: int, slots: int = 0) -> int:
    """The expert slots of an EP-`ep` group: `slots` when given (they must split over the ranks),
    else the fewest that split evenly and hold every expert (extra ones hold replicas)."""
    if slots:
        if slots % ep or slots < experts:
            raise ValueError(
                f"{slots} expert slots do not split evenly over EP {ep} (or hold fewer than the {experts} "
                f"experts); {-(-experts // ep) * ep} would"
            )
        return slots
    return -(-experts // ep) * ep


@dataclass(frozen=True)
class RankFootprint:
    """Bytes one rank of an EP group holds."""

    ep: int
    slots_per_rank: int
    dense_bytes: int
    expert_bytes: int
    kv_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.dense_bytes + self.expert_bytes + self.kv_bytes


def footprint(
    size: ModelSize, ep: int, dtype: str, kv_tokens: int, slots: int = 0, fp8: bool = True
) -> RankFootprint:
    """One rank of EP `ep` with `slots` expert slots in all (0: the fewest that split over the ranks;
    more than the experts: replicas). `fp8`: an FP8 checkpoint's weights as the loader keeps them."""
    slots = slots_for(size.experts, ep, slots)
    b = DTYPE_BYTES[dtype]
    per_rank = slots // ep
    kept = size.fp8_dense_params if fp8 else 0
    dense = (size.dense_params - kept) * b + kept + (4 * size.fp8_dense_scales if fp8 else 0)
    expert_bytes = size.routed_params * per_rank // size.experts * b
    if fp8 and size.fp8_experts:
        expert_bytes = (size.routed_params + 4 * size.expert_scales) * per_rank // size.experts
    return RankFootprint(
        ep=ep,
        slots_per_rank=per_rank,
        dense_bytes=dense,
        expert_bytes=expert_bytes,
        kv_bytes=kv_tokens * size.kv_bytes_per_token_per_dtype_byte * b,
    )


def smallest_ep(
    size: ModelSize, dtype: str, kv_tokens: int, memory: int, slots: int = 0, fp8: bool = True
) -> int | None:
    """The smallest EP width (a divisor of the slot count: one slot per expert unless `slots` says
    more) whose ranks fit in `memory`."""
    slots = slots or size.experts
    for ep in range(1, slots + 1):
        if slots % ep:
            continue
        if footprint(size, ep, dtype, kv_tokens, slots, fp8).total_bytes <= memory:
            return ep
    return None


def checkpoint_bytes(model_dir: Path) -> int | None:
    """Bytes of the checkpoint's tensors (from the safetensors headers), None without weights."""
    from services.models.config import ModelConfigError
    from services.models.loading.checkpoint import Checkpoint

    try:
        with Checkpoint(model_dir) as ckpt:
            return ckpt.total_bytes
    except ModelConfigError:
        return None


def report(
    model_dir: Path,
    ep: int,
    dtype: str,
    kv_tokens: int,
    memory: int | None,
    slots: int = 0,
    fp8: bool = True,
) -> dict[str, Any]:
    """Everything `moeserve inspect-model` prints, as a JSON-able dict."""
    cfg = ModelConfig.from_dir(model_dir)
    size = ModelSize.of(cfg)
    rank = footprint(size, ep, dtype, kv_tokens, slots, fp8)
    used = slots_for(size.experts, ep, slots)
    out = {
        "model": str(model_dir),
        **asdict(size),
        "total_params": size.total_params,
        "active_params": size.active_params,
        "quantization": "fp8 block" if cfg.quant else None,
        "weights": "fp8 kept" if cfg.quant and fp8 else dtype,
        "slots": used,
        "redundant_experts": used - size.experts,
        "mtp_layers": cfg.num_mtp_layers,
        "checkpoint_bytes": checkpoint_bytes(model_dir),
        "dtype": dtype,
        "kv_tokens": kv_tokens,
        "rank": {**asdict(rank), "total_bytes": rank.total_bytes},
    }
    del out["kv_bytes_per_token_per_dtype_byte"]
    out["kv_bytes_per_token"] = size.kv_bytes_per_token_per_dtype_byte * DTYPE_BYTES[dtype]
    if memory is not None:
        out["device_memory"] = memory
        out["fits"] = rank.total_bytes <= memory
        out["smallest_ep_that_fits"] = smallest_ep(size, dtype, kv_tokens, memory, slots, fp8)
    return out
