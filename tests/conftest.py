"""Shared fixtures: tiny random checkpoints built once per session, and the `gpu` marker."""

from __future__ import annotations

import os

import pytest
import torch

from services.tools.tiny import make_tiny_model

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = {
    "deepseek_v3": dict(arch="deepseek_v3", q_lora_rank=48),
    "deepseek_v3_no_q_lora": dict(arch="deepseek_v3", q_lora_rank=None),
    "qwen3_moe": dict(arch="qwen3_moe"),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: make_tiny_model(root / name, seed=1, **kw) for name, kw in MODELS.items()}


FP8_SHAPES = dict(hidden_size=192, intermediate_size=320, moe_intermediate_size=160)
"""Dimensions that are not multiples of the 128 x 128 scale blocks: partial edge blocks."""


@pytest.fixture(scope="session")
def fp8_dirs(tmp_path_factory):
    """Per family: (an FP8 block-quantized checkpoint in the official layout, sharded with an
    index, DeepSeek's with an MTP layer; the same weights dequantized for transformers)."""
    from services.tools.synthetic import write_fp8_checkpoint
    from tests.fp8 import write_dequantized

    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for arch in ("deepseek_v3", "qwen3_moe"):
        src = make_tiny_model(root / f"{arch}-src", arch, seed=3, overrides=FP8_SHAPES)
        fp8 = write_fp8_checkpoint(
            src, root / f"{arch}-fp8", mtp=arch == "deepseek_v3", max_shard_bytes=400_000
        )
        out[arch] = (fp8, write_dequantized(fp8, root / f"{arch}-dequantized"))
    return out


FP8_ALIGNED = {
    "deepseek_v3": dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, kv_lora_rank=128),
    "qwen3_moe": dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, head_dim=32),
}
"""Sizes the block-scaled GEMM takes (contractions multiples of 128), so layers stay in FP8."""


@pytest.fixture(scope="session")
def fp8_aligned_dirs(tmp_path_factory):
    """Per family: an FP8 checkpoint whose linear layers and experts can all be kept in FP8."""
    from services.tools.synthetic import write_fp8_checkpoint

    root = tmp_path_factory.mktemp("fp8-aligned")
    out = {}
    for arch, shapes in FP8_ALIGNED.items():
        q_lora = {"q_lora_rank": 128} if arch == "deepseek_v3" else {}
        src = make_tiny_model(root / f"{arch}-src", arch, seed=3, overrides=shapes, **q_lora)
        out[arch] = write_fp8_checkpoint(src, root / f"{arch}-fp8")
    return out


@pytest.fixture(scope="session", params=list(MODELS))
def model_dir(request, model_dirs):
    return model_dirs[request.param]


@pytest.fixture(scope="session")
def ds_dir(model_dirs):
    return model_dirs["deepseek_v3"]


def pytest_collection_modifyitems(config, items):
    # gpu-marked tests need CUDA; everywhere else they are reported as skipped, with the reason.
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="gpu test: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)
