"""Load a supported checkpoint from a Hugging Face style directory (config.json + safetensors shards)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from services.ep import ExpertParallel
from services.models.base import MoECausalLM
from services.models.config import ModelConfig, ModelConfigError
from services.models.deepseek_v3 import DeepseekV3ForCausalLM
from services.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_CLASSES: dict[str, type[MoECausalLM]] = {
    "deepseek_v3": DeepseekV3ForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
}
INDEX_FILE = "model.safetensors.index.json"


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a checkpoint, checked to exist."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelConfigError(f"{index} is not a valid safetensors index (needs 'weight_map')") from e
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelConfigError(f"{index} lists shard(s) missing from {model_dir}: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelConfigError(f"model directory {model_dir} has no *.safetensors weights")
    return files


def iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    parallel: Callable[[ModelConfig], ExpertParallel] | None = None,
) -> tuple[MoECausalLM, ModelConfig]:
    """Build the model for `model_dir` and load its weights; errors name the file and what is wrong.

    `parallel(config)` gives this rank's expert-parallel view (default: one rank, all experts).
    """
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    files = shard_files(model_dir)
    model = MODEL_CLASSES[cfg.family](cfg, parallel(cfg) if parallel is not None else None)
    # Routers stay fp32 (their parameters are declared fp32); everything else takes `dtype`.
    for name, p in model.named_parameters():
        if ".gate." not in name:
            p.data = p.data.to(dtype)
    loaded = model.load_weights(iter_weights(files))
    missing = sorted(set(dict(model.named_parameters())) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelConfigError(f"checkpoint in {model_dir} is missing tensors: {shown}")
    model.to(device).eval()
    return model, cfg
