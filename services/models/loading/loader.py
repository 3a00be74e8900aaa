"""Build a model from a checkpoint directory, reading only what this rank holds.

The model is built on the meta device (no weight memory), then each parameter is allocated once,
on its device and in its final dtype. Which checkpoint tensors this rank needs is decided from
their names (`weights.WeightMap`) before a byte is read: another rank's experts and
multi-token-prediction layers are never read. Shards are read in parallel by a few threads, each
tensor's exact byte range (`checkpoint.Checkpoint`); FP8 block-quantized weights are
dequantized in place in their parameter (`quant.Fp8BlockQuant`). A byte budget between the
readers and the copy into parameters keeps the memory beyond the final weights to a tenth of
them. The same path
serves every checkpoint: bf16/fp16/fp32 or FP8, one file or sharded with an index.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import get_args

import torch
from torch import nn

from services.ep import ExpertParallel
from services.models import fp8 as fp8_gemm
from services.models.base import MoECausalLM
from services.models.config import ModelConfig, ModelConfigError
from services.models.deepseek_v3 import DeepseekV3ForCausalLM
from services.models.load_report import LoadReport
from services.models.loading.checkpoint import Checkpoint
from services.models.loading.reading import read_into_model
from services.models.loading.weights import Route, WeightMap
from services.models.moe import RoutedExperts
from services.models.quant import SCALE_SUFFIX, Fp8Mode
from services.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_CLASSES: dict[str, Callable[[ModelConfig, ExpertParallel | None], MoECausalLM]] = {
    "deepseek_v3": DeepseekV3ForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

log = logging.getLogger("moeserve.loader")


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    parallel: Callable[[ModelConfig], ExpertParallel] | None = None,
    report: Callable[[str], None] | None = None,
    fp8: str = "auto",
) -> tuple[MoECausalLM, ModelConfig]:
    """Build the model for `model_dir` and load this rank's weights; errors name the file and problem.

    `parallel(config)` gives this rank's expert-parallel view (default: one rank, all experts).
    `report(line)` receives progress lines of a long load (default: the `moeserve.loader` log).
    `fp8` (FP8 block-quantized checkpoints): "keep" holds the weights in FP8 and runs
    block-scaled GEMMs (cuBLAS where the device has them, a reference elsewhere), "dequantize"
    converts them to `dtype` at load, "auto" keeps them where the GEMM is native.
    The model's `load_report` says what was read, kept and skipped.
    """
    if fp8 not in get_args(Fp8Mode):
        raise ValueError(f"fp8 must be one of {', '.join(get_args(Fp8Mode))}, got {fp8!r}")
    start = time.monotonic()
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    par = (
        parallel(cfg) if parallel is not None else ExpertParallel.single(len(cfg.moe_layers), cfg.num_experts)
    )
    with Checkpoint(model_dir) as ckpt:
        model = build_on_meta(cfg, par)
        native = fp8_gemm.native_supported(torch.device(device))
        kernel = ""
        if cfg.quant is not None and (fp8 == "keep" or (fp8 == "auto" and native)):
            _keep_fp8(model, ckpt, cfg, native)
            kernel = (
                "cuBLAS block-scaled GEMM" if native else f"reference GEMM: no native FP8 GEMM on {device}"
            )
        tied = cfg.tie_word_embeddings and "lm_head.weight" not in ckpt.entries
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        materialize(model, dtype, torch.device(device))
        par = model.parallel
        local = par.placement.phys_to_log[
            :, par.first_local_slot : par.first_local_slot + par.placement.slots_per_rank
        ]
        weights = WeightMap(model, cfg, local)
        plan, rep = _plan(ckpt, weights, cfg, model_dir)
        rep.checkpoint_bytes, rep.fp8_kernel = ckpt.total_bytes, kernel
        filled = read_into_model(ckpt, plan, weights, cfg, report or log.info, start)
        rep.bytes_read, rep.tensors_read = ckpt.bytes_read, len(plan)
    missing = sorted(p for p in weights.params if filled[p] != weights.expected_pieces(p))
    if tied:
        missing = [p for p in missing if p != "lm_head.weight"]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelConfigError(f"checkpoint in {model_dir} is missing tensors: {shown}")
    rep.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rep.seconds = time.monotonic() - start
    model.eval()
    model.load_report = rep
    return model, cfg


def build_on_meta(cfg: ModelConfig, parallel: ExpertParallel) -> MoECausalLM:
    """The model with every parameter on the meta device (no memory, no init); `parallel` stays real."""
    with torch.device("meta"), _no_init():
        return MODEL_CLASSES[cfg.family](cfg, parallel)


def _keep_fp8(model: MoECausalLM, ckpt: Checkpoint, cfg: ModelConfig, native: bool) -> None:
    """Swap in FP8 layers (on meta) where the checkpoint holds block-quantized weights the GEMM
    takes: linear layers whose weight has a scale beside it (bar those a module reads raw, such
    as MLA's absorbed `kv_b_proj`), and routed experts with 128-aligned sizes."""
    aligned = cfg.hidden_size % fp8_gemm.BLOCK == 0 and cfg.moe_intermediate_size % fp8_gemm.BLOCK == 0
    with torch.device("meta"):
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if isinstance(child, nn.Linear):
                    quantized = f"{full}.weight{SCALE_SUFFIX}" in ckpt.entries
                    raw = child_name in getattr(module, "dequantized", ())
                    if quantized and not raw and fp8_gemm.eligible(child.out_features, child.in_features):
                        layer = fp8_gemm.Fp8Linear.like(child)
                        layer.native = native
                        setattr(module, child_name, layer)
                elif (
                    isinstance(child, RoutedExperts)
                    and aligned
                    and f"{full}.0.down_proj.weight{SCALE_SUFFIX}" in ckpt.entries
                ):
                    child.keep_fp8(native)


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip `torch.nn.init` while building on meta: every value comes from the checkpoint, and
    random init on meta tensors goes through torch's reference ops, which import sympy (~75 MB)."""
    saved = {
        n: f for n, f in vars(nn.init).items() if n.endswith("_") and not n.startswith("_") and callable(f)
    }
    for n in saved:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def materialize(model: MoECausalLM, dtype: torch.dtype, device: torch.device) -> None:
    """Allocate every parameter once, on `device` in its final dtype; move buffers (made on the CPU).

    Modules that say they keep fp32 (DeepSeek's router) stay fp32, weights kept in FP8 and their
    block scales keep their dtypes; everything else takes `dtype`.
    """
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:  # tied parameters are allocated once
                keep = (
                    getattr(module, "keeps_fp32", False)
                    or p.dtype in FP8_DTYPES
                    or pname.endswith(SCALE_SUFFIX)
                )
                final = p.dtype if keep else dtype
                made[id(p)] = nn.Parameter(
                    torch.empty(p.shape, dtype=final, device=device), requires_grad=False
                )
            module._parameters[pname] = made[id(p)]
        for bname, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[bname] = b.to(device)
    model.parallel.to(device)  # routing tables and load counts where the router's ids are
    model.parallel.prepare(model.config.hidden_size, model.config.num_experts_per_tok)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device != device]
    if left:
        raise RuntimeError(f"tensors left unallocated after load: {', '.join(left[:5])}")


def _plan(
    ckpt: Checkpoint, weights: WeightMap, cfg: ModelConfig, model_dir: Path
) -> tuple[dict[str, tuple[Route, str | None]], LoadReport]:
    """{tensor to read: (its route, its scale tensor or None)}, and the report of what is skipped."""
    rep = LoadReport()
    skipped: dict[str, int] = defaultdict(int)
    plan: dict[str, tuple[Route, str | None]] = {}
    unknown: list[str] = []
    mtp: set[int] = set()
    for name, entry in ckpt.entries.items():
        if name.endswith(SCALE_SUFFIX):
            weight = name.removesuffix(SCALE_SUFFIX)
            if weight not in ckpt.entries:
                raise ModelConfigError(f"{entry.file}: {name} has no weight {weight}")
            held = weights.route(weight)
            if held is None or held.skip or not weights.keeps_fp8(held):
                continue  # read with its weight to dequantize it, or not at all
            route = weights.route(name)
            if route is None:
                raise ModelConfigError(f"{entry.file}: no parameter takes {name}, the scale of {weight}")
            if not route.skip:
                plan[name] = (route, None)
            continue
        route = weights.route(name)
        if route is None:
            unknown.append(name)
            continue
        if route.skip:
            skipped[route.skip] += 1
            if route.skip == "mtp":
                mtp.add(int(name.split(".")[2]))
            continue
        scale = name + SCALE_SUFFIX if name + SCALE_SUFFIX in ckpt.entries else None
        if scale is not None and cfg.quant is None:
            raise ModelConfigError(
                f"{entry.file}: {name} has a block scale but config.json has no quantization_config"
            )
        if scale is None and entry.dtype in FP8_DTYPES:
            raise ModelConfigError(f"{entry.file}: {name} is {entry.dtype} without a {name}{SCALE_SUFFIX}")
        kept = weights.keeps_fp8(route)
        plan[name] = (route, None if kept else scale)
        rep.fp8_kept += kept
        rep.quantized_tensors += scale is not None and not kept
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ModelConfigError(
            f"checkpoint in {model_dir} has tensors no {cfg.architecture} parameter takes: {shown}"
        )
    rep.skipped, rep.mtp_layers = dict(skipped), tuple(sorted(mtp))
    return plan, rep
