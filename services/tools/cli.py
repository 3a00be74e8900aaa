"""Worker-side commands, run as `python -m services.tools.cli ...` (the `moeserve` CLI execs into these).

make-tiny-model DIR --arch deepseek_v3|qwen3_moe   write a tiny random checkpoint + tokenizer
generate [--model DIR] --prompt TEXT                offline chat generation with the engine
inspect-model DIR [--ep W] [--kv-tokens N]          sizes, and what one rank of EP W must hold
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from services.common.typer_main import ModelArch, namespace, run_app

DEFAULT_CACHE = Path(os.environ.get("MOESERVE_CACHE", Path.home() / ".cache" / "moeserve"))


class DtypeChoice(StrEnum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class OutputChoice(StrEnum):
    text = "text"
    json = "json"


def tiny_model_dir(arch: str = "deepseek_v3") -> Path:
    """The cached tiny model of `arch`, created on first use."""
    from services.tools.tiny import make_tiny_model

    path = DEFAULT_CACHE / f"tiny-{arch}"
    if not (path / "config.json").is_file():
        print(f"creating tiny {arch} model in {path}", file=sys.stderr)
        make_tiny_model(path, arch)  # type: ignore[arg-type]
    return path


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from services.tools.tiny import make_tiny_model

    path = make_tiny_model(args.dir, args.arch, seed=args.seed)
    print(f"wrote tiny {args.arch} model to {path}")
    return 0


def cmd_tiny_model_path(args: argparse.Namespace) -> int:
    print(tiny_model_dir(args.arch))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from services.engine import Engine, SamplingParams

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else tiny_model_dir(args.arch)
    engine = Engine.from_pretrained(model_dir)  # validates the directory before anything else reads it
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        raise ValueError(f"model directory {model_dir} has no tokenizer files (tokenizer.json)")
    config_file = model_dir / "tokenizer_config.json"
    code = json.loads(config_file.read_text()).get("auto_map", {}) if config_file.is_file() else {}
    if code.get("AutoTokenizer") and not args.trust_remote_code:
        raise ValueError(
            f"model directory {model_dir} tokenizes with its own code ({code['AutoTokenizer'][0]}); "
            "it runs only with --trust-remote-code (read it first)"
        )
    tok = AutoTokenizer.from_pretrained(
        model_dir, local_files_only=True, trust_remote_code=args.trust_remote_code
    )
    prompt: Any = tok.apply_chat_template(  # token ids, or a BatchEncoding holding them
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True
    )
    prompt_ids = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    start = time.perf_counter()
    (out,) = engine.generate([prompt_ids], params)
    elapsed = time.perf_counter() - start
    print(f"model: {model_dir} ({engine.model_config.architecture})")
    print(f"prompt ({len(prompt_ids)} tokens): {args.prompt}")
    print(f"output ({len(out.output_token_ids)} tokens, finish_reason={out.finish_reason}, {elapsed:.2f}s):")
    print(tok.decode(out.output_token_ids, skip_special_tokens=True))
    return 0


def _gb(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.2f} M"


def cmd_inspect_model(args: argparse.Namespace) -> int:
    import json

    from services.models.loading.inspect import parse_bytes, report

    memory = parse_bytes(args.device_memory) if args.device_memory else None
    r = report(Path(args.dir), args.ep, args.dtype, args.kv_tokens, memory, args.ep_slots, args.fp8 == "keep")
    if args.output == "json":
        print(json.dumps(r, indent=2))
        return 0
    rank = r["rank"]
    lines = [
        f"model:        {r['model']} ({r['architecture']}, {r['layers']} layers, {r['moe_layers']} MoE)",
        f"experts:      {r['experts']} routed, {r['experts_per_token']} per token",
        f"parameters:   {_count(r['total_params'])} total, {_count(r['active_params'])} active per token "
        f"({_count(r['routed_params'])} in routed experts)",
        f"checkpoint:   {_gb(r['checkpoint_bytes'])} on disk"
        + (f", {r['quantization']}" if r["quantization"] else "")
        + (f", {r['mtp_layers']} MTP layer(s) not served" if r["mtp_layers"] else ""),
        f"KV cache:     {r['kv_bytes_per_token']:,} bytes per token ({args.dtype})",
        f"expert slots: {r['slots']} over EP{rank['ep']}"
        + (
            f" ({r['redundant_experts']} redundant: the fewest that split evenly)"
            if r["redundant_experts"]
            else ""
        ),
        f"one rank of EP{rank['ep']} ({r['weights']} weights, {rank['slots_per_rank']} expert slots, "
        f"{args.kv_tokens:,} {args.dtype} KV tokens):",
        f"  dense       {_gb(rank['dense_bytes'])}",
        f"  experts     {_gb(rank['expert_bytes'])}",
        f"  KV cache    {_gb(rank['kv_bytes'])}",
        f"  total       {_gb(rank['total_bytes'])}",
    ]
    if memory is not None:
        fits = "fits" if r["fits"] else "does NOT fit"
        smallest = r["smallest_ep_that_fits"]
        lines.append(
            f"device:       {_gb(memory)}: EP{rank['ep']} {fits}; smallest EP that fits: {smallest or 'none'}"
        )
    print("\n".join(lines))
    return 0


Arch = Annotated[ModelArch, typer.Option(help="which tiny model")]
app = typer.Typer(name="moeserve", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _run(cmd: Callable[[argparse.Namespace], int], **params: Any) -> None:
    """Run a command; our errors (ValueError: they say what to change) exit 2 without a traceback."""
    try:
        code = cmd(namespace(params))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    raise typer.Exit(code)


@app.command("make-tiny-model", help="write a tiny random-weight checkpoint with a tokenizer")
def make_tiny_model_command(dir: str, arch: Arch = ModelArch.deepseek_v3, seed: int = 0) -> None:
    _run(cmd_make_tiny_model, dir=dir, arch=arch, seed=seed)


@app.command("tiny-model-path", help="print the cached tiny model's directory (building it if needed)")
def tiny_model_path(arch: Arch = ModelArch.deepseek_v3) -> None:
    _run(cmd_tiny_model_path, arch=arch)


@app.command(help="offline chat generation with the engine")
def generate(
    prompt: Annotated[str, typer.Option(help="the user message")],
    model: Annotated[
        str | None, typer.Option(help="model directory (default: the cached tiny model)")
    ] = None,
    arch: Arch = ModelArch.deepseek_v3,
    max_tokens: int = 32,
    temperature: float = 0.0,
    seed: int | None = None,
    threads: int = 1,
    trust_remote_code: Annotated[
        bool, typer.Option(help="load a tokenizer that is Python code in the model directory (Kimi K2's)")
    ] = False,
) -> None:
    _run(cmd_generate, prompt=prompt, model=model, arch=arch, max_tokens=max_tokens,
         temperature=temperature, seed=seed, threads=threads,
         trust_remote_code=trust_remote_code)  # fmt: skip


@app.command("inspect-model", help="sizes of a model, and what one rank of an EP group holds")
def inspect_model(
    dir: str,
    ep: Annotated[int, typer.Option(help="expert-parallel width of the group")] = 1,
    ep_slots: Annotated[
        int, typer.Option(help="expert slots over the group (default: the fewest that split over --ep)")
    ] = 0,
    kv_tokens: Annotated[int, typer.Option(help="KV cache tokens each rank holds")] = 0,
    dtype: Annotated[DtypeChoice, typer.Option(help="weights and KV dtype")] = DtypeChoice.bfloat16,
    device_memory: Annotated[str | None, typer.Option(help="memory of one device, e.g. 80GiB")] = None,
    fp8: Annotated[
        Literal["keep", "dequantize"],
        typer.Option(help="FP8 checkpoints: priced as kept (1 byte) or dequantized"),
    ] = "keep",
    output: Annotated[OutputChoice, typer.Option(help="text or json")] = OutputChoice.text,
) -> None:
    _run(cmd_inspect_model, dir=dir, ep=ep, ep_slots=ep_slots, kv_tokens=kv_tokens, dtype=dtype,
         device_memory=device_memory, fp8=fp8, output=output)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    return run_app(app, argv, "moeserve")


if __name__ == "__main__":
    sys.exit(main())
