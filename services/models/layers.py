"""Building blocks shared by the model families: RMSNorm, rotary embeddings, dense MLP."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from services.models.config import RopeConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, weight applied in the input dtype (as the reference implementations do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class DenseMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scaling factor for `rope`."""
    dim, base = rope.dim, rope.theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [dim/2]
    if rope.kind == "default":
        return 1.0 / pos_freqs, 1.0

    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # share of each dim that keeps the original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def yarn_softmax_scale(rope: RopeConfig, head_dim: int) -> float:
    """DeepSeek's attention softmax scale: head_dim^-0.5, times mscale^2 under yarn with mscale_all_dim."""
    scale: float = head_dim**-0.5
    if rope.kind == "yarn" and rope.mscale_all_dim:
        m = _yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale *= m * m
    return scale


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for a step's positions once; every layer then applies them with `apply_rotary`."""

    inv_freq: torch.Tensor

    def __init__(self, rope: RopeConfig):
        super().__init__()
        # Computed on the CPU even when the model is built on the meta device (the loader moves
        # it): these few ops on meta would import sympy (~75 MB) for nothing.
        with torch.device("cpu"):
            inv_freq, self.scaling = rope_inv_freq(rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> (cos, sin), each [T, 1, dim/2], computed in fp32 and cast to `dtype`."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, dim/2]
        cos, sin = (freqs.cos() * self.scaling).unsqueeze(1), (freqs.sin() * self.scaling).unsqueeze(1)
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], interleave: bool) -> torch.Tensor:
    """x: [T, H, dim] -> rotated [T, H, dim].

    Interleaved (DeepSeek) pairs are (x0, x1), (x2, x3)...; the output is de-interleaved (evens
    then odds) exactly like the reference implementation, consistently for q and k.
    """
    cos, sin = rope
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
