"""What a weight load read, skipped and built: kept on the model (`MoECausalLM.load_report`) and
summed up in the worker's ready line."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """What a load read, skipped and built (kept on the model as `load_report`)."""

    bytes_read: int = 0
    checkpoint_bytes: int = 0
    tensors_read: int = 0
    quantized_tensors: int = 0
    """FP8 weights dequantized at load."""
    fp8_kept: int = 0
    """FP8 weights held in FP8 with their block scales."""
    fp8_kernel: str = ""
    """What runs the GEMMs of the weights kept in FP8."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Tensors not read, by reason ("mtp", "other rank", "derived")."""
    mtp_layers: tuple[int, ...] = ()
    weight_bytes: int = 0
    """Bytes of this rank's parameters once loaded."""
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"read {_size(self.bytes_read)} of {_size(self.checkpoint_bytes)} in {self.seconds:.1f}s"]
        if self.quantized_tensors:
            parts.append(f"{self.quantized_tensors} FP8 block-quantized weights dequantized")
        if self.fp8_kept:
            parts.append(f"{self.fp8_kept} weights kept in FP8 ({self.fp8_kernel})")
        if self.skipped.get("other rank"):
            parts.append(f"{self.skipped['other rank']} expert tensors of other ranks not read")
        if self.mtp_layers:
            layers = ", ".join(map(str, self.mtp_layers))
            parts.append(f"multi-token-prediction layer(s) {layers} skipped ({self.skipped['mtp']} tensors)")
        return "; ".join(parts)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
