"""How big a model is and what one rank of an EP group must hold: `moeserve inspect-model`.

Built from config.json alone (the model on the meta device, no weight read): parameters total
and active per token, and per rank of an EP-W group the dense weights (attention, dense MLPs,
shared experts, routers, embeddings: every rank holds them under data-parallel attention), its
share of the routed experts' slots, and the KV cache of N tokens; then whether that fits a
device, and the smallest EP width that does. The checkpoint's own size on disk (MTP layers and
FP8 scales included) is read from the safetensors headers when present.
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

    @property
    def total_params(self) -> int:
        return self.dense_params + self.routed_params

    @property
    def active_params(self) -> int:
        return self.dense_params + self.routed_params * self.experts_per_token // self.experts

    @classmethod
    def of(cls, cfg: ModelConfig) -> ModelSize:
        from services.ep import ExpertParallel
        from services.models.loading.loader import build_on_meta

        model = build_on_meta(cfg, ExpertParallel.single(len(cfg.moe_layers), cfg.num_experts))
        routed = dense = 0
        for name, p in model.named_parameters():
            if name.endswith((".experts.w13", ".experts.w2")):
                routed += p.numel()
            else:
                dense += p.numel()
        return cls(
            architecture=cfg.architecture,
            layers=cfg.num_layers,
            moe_layers=len(cfg.moe_layers),
            experts=cfg.num_experts,
            experts_per_token=cfg.num_experts_per_tok,
            dense_params=dense,
            routed_params=routed,
            kv_bytes_per_token_per_dtype_byte=cfg.num_layers * math.prod(cfg.kv_entry_shape),
        )


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


def footprint(size: ModelSize, ep: int, dtype: str, kv_tokens: int, slots: int = 0) -> RankFootprint:
    """One rank of EP `ep` with `slots` expert slots in all (0: one per expert; more: replicas)."""
    slots = slots or size.experts
    if slots % ep:
        raise ValueError(f"{slots} expert slots do not split evenly over EP {ep}")
    b = DTYPE_BYTES[dtype]
    per_rank = slots // ep
    return RankFootprint(
        ep=ep,
        slots_per_rank=per_rank,
        dense_bytes=size.dense_params * b,
        expert_bytes=size.routed_params * per_rank // size.experts * b,
        kv_bytes=kv_tokens * size.kv_bytes_per_token_per_dtype_byte * b,
    )


def smallest_ep(size: ModelSize, dtype: str, kv_tokens: int, memory: int, slots: int = 0) -> int | None:
    """The smallest EP width (a divisor of the slot count) whose ranks fit in `memory`."""
    slots = slots or size.experts
    for ep in range(1, slots + 1):
        if slots % ep == 0 and footprint(size, ep, dtype, kv_tokens, slots).total_bytes <= memory:
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
    model_dir: Path, ep: int, dtype: str, kv_tokens: int, memory: int | None, slots: int = 0
) -> dict[str, Any]:
    """Everything `moeserve inspect-model` prints, as a JSON-able dict."""
    cfg = ModelConfig.from_dir(model_dir)
    size = ModelSize.of(cfg)
    rank = footprint(size, ep, dtype, kv_tokens, slots)
    out = {
        "model": str(model_dir),
        **asdict(size),
        "total_params": size.total_params,
        "active_params": size.active_params,
        "quantization": "fp8 block" if cfg.quant else None,
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
        out["smallest_ep_that_fits"] = smallest_ep(size, dtype, kv_tokens, memory, slots)
    return out
