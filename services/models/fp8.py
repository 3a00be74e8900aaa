"""FP8 weights kept in FP8: block-scaled GEMMs for linear layers and routed experts.

DeepSeek's recipe: weights in float8_e4m3fn with one scale per 128 x 128 block (as the
checkpoint stores them), activations quantized on the fly to float8_e4m3fn with one scale per
token and 128 columns. On CUDA GPUs of compute capability 9.0 and up, the product runs as one
block-scaled GEMM (`torch.nn.functional.scaled_mm` with `BlockWise1x128` x `BlockWise128x128`,
cuBLAS; activation scales token-major with the token count padded to a multiple of 4, weight
scales with their K blocks padded to a multiple of 4, as cuBLAS requires). Elsewhere the same
arithmetic runs as a reference (dequantize both operands, fp32 matmul): slow, but it keeps the
weights at one byte per parameter and lets every CPU test run this path.

Status: the reference path runs in every CI run; the cuBLAS path has NOT run on hardware yet
(no GPU was lent to the session that wrote it); its gpu-marked test compares it with the
dequantized model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def native_supported(device: torch.device) -> bool:
    """Whether the block-scaled FP8 GEMM runs natively on `device` (else the reference runs)."""
    scaling = getattr(F, "ScalingType", None)
    if device.type != "cuda" or scaling is None or not hasattr(scaling, "BlockWise128x128"):
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of 128) -> (float8 [M, K], fp32 scales [M, K/128]) per token and group."""
    m, k = x.shape
    groups = x.float().view(m, k // BLOCK, BLOCK)
    scale = groups.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX  # [M, K/128]
    return (groups / scale[..., None]).view(m, k).to(FP8), scale


def _dequantize_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    s = scale.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return w.float() * s


def block_scaled_mm(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, native: bool | None = None
) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] x its 128x128 block scales [N/128, K/128]).T -> [M, N] in x.dtype."""
    m = x.shape[0]
    if m == 0:
        return x.new_empty(0, weight.shape[0])
    xq, xs = quantize_activations(x)
    if native is None:
        native = native_supported(x.device)
    if native:
        pad = -m % 4
        if pad:  # cuBLAS wants the token count of the activation scales a multiple of 4
            xq = torch.cat((xq, xq.new_zeros(pad, xq.shape[1])))
            xs = torch.cat((xs, xs.new_ones(pad, xs.shape[1])))
        kb = scale.shape[1]
        ws = F.pad(scale, (0, -kb % 4)) if kb % 4 else scale
        y = F.scaled_mm(
            xq,
            weight.t(),
            xs.t().contiguous().t(),  # token-major
            F.ScalingType.BlockWise1x128,
            ws.t(),
            F.ScalingType.BlockWise128x128,
            output_dtype=x.dtype,
        )
        return y[:m]
    xd = (xq.float().view(m, -1, BLOCK) * xs[..., None]).view(m, -1)
    return (xd @ _dequantize_weight(weight, scale).t()).to(x.dtype)


def dequantize_stacked(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stacked expert weights [S, N, K] in FP8 with block scales [S, N/128, K/128] -> [S, N, K] in
    `dtype`, on the weights' device, with no host sync (partial edge blocks included)."""
    _, n, k = weight.shape
    s = scale.repeat_interleave(BLOCK, 1)[:, :n].repeat_interleave(BLOCK, 2)[:, :, :k]
    return (weight.float() * s).to(dtype)


def eligible(out_features: int, in_features: int) -> bool:
    """Shapes the block-scaled GEMM takes: the contraction a multiple of 128, output of 16."""
    return in_features % BLOCK == 0 and out_features % 16 == 0


class Fp8Linear(nn.Module):
    """A linear layer whose weight stays FP8 with its block scales (`weight_scale_inv`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        rows, cols = -(-out_features // BLOCK), -(-in_features // BLOCK)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(rows, cols, dtype=torch.float32), requires_grad=False
        )
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.native: bool | None = None
        """cuBLAS (True) or the reference (False); None: decide from the device on each call."""

    @classmethod
    def like(cls, linear: nn.Linear) -> Fp8Linear:
        return cls(linear.in_features, linear.out_features, linear.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = block_scaled_mm(x.reshape(-1, self.in_features), self.weight, self.weight_scale_inv, self.native)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)
