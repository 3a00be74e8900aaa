"""Checkpoints made here, in the layout of the official releases: FP8 copies and sized random ones.

- `write_fp8_checkpoint(src, out)`: the FP8 block-quantized form of a bf16/fp32 checkpoint, as
  DeepSeek-V3/R1, Kimi K2 and Qwen3 FP8 ship: every linear weight of the decoder layers (not the
  routers, norms, embeddings or head) as `float8_e4m3fn` with a float32 `weight_scale_inv` per
  128 x 128 block, `quantization_config` in config.json, optionally a multi-token-prediction
  layer past the decoder stack (DeepSeek's `model.layers.{num_hidden_layers}.*`), sharded with
  an index.
- `write_random_checkpoint(out, target_bytes)`: a DeepSeek-V3-shaped checkpoint of about the
  requested size with random weights, for load tests and benchmarks (no tokenizer).
Nothing here is downloaded; tests and `bench/load.py` build what they load.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.models.loading.checkpoint import INDEX_FILE

FP8_MAX = 448.0
"""Largest finite float8_e4m3fn."""
BLOCK = (128, 128)
QUANT_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


def quantize_block_fp8(w: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (float8_e4m3fn [out, in], float32 scale_inv [ceil(out/bo), ceil(in/bi)])."""
    out, inp = w.shape
    bo, bi = block
    rows, cols = -(-out // bo), -(-inp // bi)
    padded = torch.zeros(rows * bo, cols * bi, dtype=torch.float32)
    padded[:out, :inp] = w.float()
    tiles = padded.view(rows, bo, cols, bi)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # [rows, cols]
    q = (tiles / scale[:, None, :, None]).view(rows * bo, cols * bi)[:out, :inp]
    return q.to(torch.float8_e4m3fn), scale


def is_quantized_in_release(name: str, t: torch.Tensor) -> bool:
    """The official FP8 releases quantize the 2-D linear weights of decoder layers, routers aside."""
    return (
        name.startswith("model.layers.")
        and name.endswith(".weight")
        and t.ndim == 2
        and ".mlp.gate." not in name
    )


def as_released(name: str, t: torch.Tensor, fp8: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensor as an FP8 release stores it: a quantized weight and its block scale, or as is."""
    if fp8 and is_quantized_in_release(name, t):
        q, scale = quantize_block_fp8(t)
        yield name, q
        yield name + "_scale_inv", scale
    else:
        yield name, t


def write_shards(tensors: Iterable[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int) -> list[Path]:
    """Save tensors in shards of at most `max_shard_bytes` (one tensor may exceed it) with an index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files: list[Path] = []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], str(out / name), metadata={"format": "pt"})
        files.append(out / name)
        weight_map.update(dict.fromkeys(shards[-1], name))

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if shards[-1]:
        flush()
    # Shard names carry their count, as the releases' do (model-00001-of-00163.safetensors).
    renamed = {}
    for i, f in enumerate(files):
        final = out / f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        f.rename(final)
        renamed[f.name] = final.name
    index = {"metadata": {}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return [out / n for n in sorted(renamed.values())]


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, by name (small checkpoints: all in memory)."""
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[name] = f.get_tensor(name)
    return out


def _mtp_layer(tensors: dict[str, torch.Tensor], num_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
    """DeepSeek's MTP module: a copy of the last decoder layer plus enorm, hnorm, eh_proj, shared_head."""
    last, mtp = f"model.layers.{num_layers - 1}.", f"model.layers.{num_layers}."
    for name, t in tensors.items():
        if name.startswith(last):
            yield mtp + name[len(last) :], t.clone()
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    g = torch.Generator().manual_seed(61)
    yield mtp + "embed_tokens.weight", tensors["model.embed_tokens.weight"].clone()
    yield mtp + "enorm.weight", torch.ones(hidden)
    yield mtp + "hnorm.weight", torch.ones(hidden)
    yield mtp + "eh_proj.weight", torch.randn(hidden, 2 * hidden, generator=g) * 0.02
    yield mtp + "shared_head.norm.weight", torch.ones(hidden)
    yield mtp + "shared_head.head.weight", tensors["lm_head.weight"].clone()


def write_fp8_checkpoint(
    src: str | Path, out: str | Path, *, mtp: bool = False, max_shard_bytes: int = 1 << 30
) -> Path:
    """The FP8 block-quantized form of checkpoint `src` in `out` (tokenizer files copied along)."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = dict(QUANT_CONFIG)
    tensors = read_tensors(src)
    if mtp:
        config["num_nextn_predict_layers"] = 1
        tensors.update(dict(_mtp_layer(tensors, int(config["num_hidden_layers"]))))

    converted = (pair for name, t in tensors.items() for pair in as_released(name, t))
    write_shards(converted, out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", INDEX_FILE):
            shutil.copy(f, out / f.name)
    return out


def random_config(hidden: int = 1024, experts: int = 64, layers: int = 4, **overrides: Any) -> dict[str, Any]:
    """A DeepSeek-V3-shaped config.json (MLA, sigmoid group routing, shared expert) at a chosen scale."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 8192,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "moe_intermediate_size": hidden // 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "n_shared_experts": 1,
        "n_routed_experts": experts,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 256,
        "q_lora_rank": 384,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        **overrides,
    }


def checkpoint_names(config: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a checkpoint for `config`, experts one by one as released."""
    from services.ep import ExpertParallel
    from services.models.config import ModelConfig
    from services.models.loading.loader import build_on_meta

    cfg = ModelConfig.from_dict(config)
    model = build_on_meta(cfg, ExpertParallel.single(len(cfg.moe_layers), cfg.num_experts))
    inter = cfg.moe_intermediate_size
    for name, p in model.named_parameters():
        prefix, _, last = name.rpartition(".")
        if last == "w13":
            for e in range(cfg.num_experts):
                yield f"{prefix}.{e}.gate_proj.weight", (inter, cfg.hidden_size)
                yield f"{prefix}.{e}.up_proj.weight", (inter, cfg.hidden_size)
        elif last == "w2":
            for e in range(cfg.num_experts):
                yield f"{prefix}.{e}.down_proj.weight", (cfg.hidden_size, inter)
        else:
            yield name, tuple(p.shape)


def write_random_checkpoint(
    out: str | Path,
    config: dict[str, Any],
    *,
    fp8: bool = False,
    max_shard_bytes: int = 256 << 20,
    seed: int = 0,
) -> Path:
    """Random weights (bf16, or FP8 with block scales) for every tensor `config` needs, sharded."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    if fp8:
        config = {**config, "quantization_config": dict(QUANT_CONFIG)}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in checkpoint_names(config):
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, dtype=torch.bfloat16)
                continue
            yield from as_released(name, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16), fp8)

    write_shards(tensors(), out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
