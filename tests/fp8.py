"""The oracle side of FP8 tests: dequantize an FP8 checkpoint the plain way, for `transformers`.

Written apart from the engine's loader on purpose (block by block, in loops), so a shared
mistake cannot make both sides agree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.tools.synthetic import read_tensors

BLOCK = 128


def dequantize_by_blocks(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    w = q.float()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] *= scale_inv[i, j]
    return w


def write_dequantized(fp8_dir: Path, out: Path) -> Path:
    """fp32 weights of the decoder stack (no MTP layer, no scales) and a config without quantization."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((fp8_dir / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config.pop("quantization_config")
    config.pop("num_nextn_predict_layers", None)
    tensors = read_tensors(fp8_dir)
    plain = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv") or name.startswith(f"model.layers.{layers}."):
            continue
        scale = tensors.get(name + "_scale_inv")
        plain[name] = dequantize_by_blocks(t, scale) if scale is not None else t.float()
    save_file(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        if (fp8_dir / name).is_file():
            shutil.copy(fp8_dir / name, out / name)
    return out
