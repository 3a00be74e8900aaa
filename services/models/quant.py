"""FP8 block-quantized checkpoints (DeepSeek-V3/R1, Kimi K2, Qwen3 FP8): the scheme and dequantization.

The official releases store a quantized linear weight `X.weight` as `float8_e4m3fn` [out, in]
with `X.weight_scale_inv` beside it: float32 [ceil(out / bo), ceil(in / bi)], one scale per
bo x bi block (`weight_block_size`, [128, 128] in every release), edge blocks partial where a
dimension is not a multiple of the block. The real weight is the FP8 value times its block's
scale (DeepSeek's `weight_dequant` multiplies by `scale_inv` despite the name). Which tensors
are quantized is read from the checkpoint: a weight with a `weight_scale_inv` beside it.
Activations are quantized at run time ("dynamic"); a static activation scheme has no support.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

Fp8Mode = Literal["auto", "keep", "dequantize"]
"""What a load does with FP8 block-quantized weights: keep them in FP8, dequantize them, or keep
them where the device has a native FP8 GEMM."""
SCALE_SUFFIX = "_scale_inv"
"""`X.weight_scale_inv` is the block scale of `X.weight`."""


class QuantConfigError(ValueError):
    """A `quantization_config` this engine cannot serve; the message names the field and value."""


@dataclass(frozen=True)
class Fp8BlockQuant:
    """`quantization_config {quant_method: fp8, weight_block_size: [bo, bi]}` with dynamic activations."""

    block: tuple[int, int] = (128, 128)

    @classmethod
    def from_config(cls, quant: dict[str, Any], source: str = "config.json") -> Fp8BlockQuant:
        def fail(field: str, value: Any, supported: str) -> QuantConfigError:
            return QuantConfigError(
                f"{source}: quantization_config.{field}={value!r} is not supported; supported: {supported}"
            )

        method = quant.get("quant_method")
        if method != "fp8":
            raise fail("quant_method", method, "'fp8' with 128x128 block scales (DeepSeek/Kimi/Qwen3 FP8)")
        fmt = quant.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise fail("fmt", fmt, "'e4m3'")
        activation = quant.get("activation_scheme", "dynamic")
        if activation != "dynamic":
            raise fail("activation_scheme", activation, "'dynamic'")
        block = quant.get("weight_block_size")
        if not (
            isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
        ):
            raise fail("weight_block_size", block, "two positive integers, e.g. [128, 128]")
        return cls(block=(block[0], block[1]))

    def dequantize_into(
        self, dst: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, name: str
    ) -> None:
        """dst [out, in] (any float dtype, any device) = FP8 `weight` times its block scales.

        In place, one row block at a time: no [out, in] temporary. FP8 values are exact in
        bf16/fp16/fp32, and each product is computed in fp32 and rounded once into `dst`.
        """
        if weight.dim() != 2:
            raise QuantConfigError(f"{name} is block-quantized but has {weight.dim()} dimensions, not 2")
        out, inp = weight.shape
        bo, bi = self.block
        expected = (-(-out // bo), -(-inp // bi))
        if tuple(scale_inv.shape) != expected:
            raise QuantConfigError(
                f"{name}{SCALE_SUFFIX} has shape {tuple(scale_inv.shape)}; a [{out}, {inp}] weight in "
                f"{bo}x{bi} blocks needs {list(expected)}"
            )
        dst.copy_(weight)
        cols = scale_inv.float().to(dst.device).repeat_interleave(bi, 1)[:, :inp]  # [out/bo, in]
        for i in range(expected[0]):
            dst[i * bo : (i + 1) * bo].mul_(cols[i])


def parse_quant(raw: dict[str, Any], source: str) -> Fp8BlockQuant | None:
    """The checkpoint's quantization scheme from config.json (None: not quantized)."""
    quant = raw.get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise QuantConfigError(f"{source}: quantization_config must be an object, got {quant!r}")
    return Fp8BlockQuant.from_config(quant, source)
