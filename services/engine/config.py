"""Engine options: one frozen dataclass, every field defaulted, documented and validated."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import get_args

import torch

from services.models.quant import Fp8Mode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineConfigError(ValueError):
    """An engine option is out of range."""


@dataclass(frozen=True)
class EngineConfig:
    """How one engine (one DP rank) runs its model."""

    dtype: str = "float32"
    """Weights and activations: float32, bfloat16 or float16."""
    device: str = "cpu"
    """Torch device, e.g. cpu or cuda:0."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; default: the model's max_position_embeddings."""
    page_size: int = 16
    """Tokens per KV page."""
    kv_pool_tokens: int | None = None
    """KV pool size in tokens (exclusive with kv_pool_bytes); default 32768 tokens."""
    kv_pool_bytes: int | None = None
    """KV pool size in bytes, rounded down to whole pages."""
    max_num_seqs: int = 64
    """Most requests in the running batch."""
    max_prefill_tokens: int = 512
    """Chunked-prefill budget: most prompt tokens computed in one step."""
    seed: int = 0
    """Draws the seeds of sampling requests that bring no seed of their own."""
    num_threads: int | None = None
    """torch intra-op threads for this process; None leaves torch's setting alone."""
    prefix_cache: bool = True
    """Reuse the KV of cached page-aligned prompt prefixes (`prefix_cache.py`)."""
    fp8: Fp8Mode = "auto"
    """FP8 block-quantized checkpoints: keep (weights stay FP8, block-scaled GEMMs), dequantize
    (to `dtype` at load), auto (keep where the device has a native FP8 GEMM: CUDA, compute 9.0+)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise EngineConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.fp8 not in get_args(Fp8Mode):
            raise EngineConfigError(f"fp8 must be auto, keep or dequantize, got {self.fp8!r}")
        for name in ("page_size", "max_num_seqs", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_model_len", "kv_pool_tokens", "kv_pool_bytes", "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EngineConfigError(f"{name} must be >= 1, got {value}")
        if self.kv_pool_tokens is not None and self.kv_pool_bytes is not None:
            raise EngineConfigError("set kv_pool_tokens or kv_pool_bytes, not both")

    @classmethod
    def from_options(cls, **options: object) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise EngineConfigError(
                f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**options)  # type: ignore[arg-type]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
