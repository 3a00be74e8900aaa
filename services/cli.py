"""Worker-side commands, run as `python -m services.cli ...` (the `moeserve` CLI execs into these).

make-tiny-model DIR --arch deepseek_v3|qwen3_moe   write a tiny random checkpoint + tokenizer
generate [--model DIR] --prompt TEXT                offline chat generation with the engine
inspect-model DIR [--ep W] [--kv-tokens N]          sizes, and what one rank of EP W must hold
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("MOESERVE_CACHE", Path.home() / ".cache" / "moeserve"))


def tiny_model_dir(arch: str = "deepseek_v3") -> Path:
    """The cached tiny model of `arch`, created on first use."""
    from services.tiny import make_tiny_model

    path = DEFAULT_CACHE / f"tiny-{arch}"
    if not (path / "config.json").is_file():
        print(f"creating tiny {arch} model in {path}", file=sys.stderr)
        make_tiny_model(path, arch)  # type: ignore[arg-type]
    return path


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from services.tiny import make_tiny_model

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
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompt = tok.apply_chat_template(
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

    from services.models.inspect import parse_bytes, report

    memory = parse_bytes(args.device_memory) if args.device_memory else None
    r = report(Path(args.dir), args.ep, args.dtype, args.kv_tokens, memory, args.ep_slots)
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
        f"one rank of EP{rank['ep']} ({args.dtype}, {rank['slots_per_rank']} expert slots, "
        f"{args.kv_tokens:,} KV tokens):",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeserve")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-tiny-model", help="write a tiny random-weight checkpoint with a tokenizer")
    p.add_argument("dir")
    p.add_argument("--arch", choices=["deepseek_v3", "qwen3_moe"], default="deepseek_v3")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)
    p = sub.add_parser(
        "tiny-model-path", help="print the cached tiny model's directory (building it if needed)"
    )
    p.add_argument("--arch", choices=["deepseek_v3", "qwen3_moe"], default="deepseek_v3")
    p.set_defaults(func=cmd_tiny_model_path)
    p = sub.add_parser("generate", help="offline chat generation with the engine")
    p.add_argument("--model", help="model directory (default: the cached tiny model)")
    p.add_argument("--arch", choices=["deepseek_v3", "qwen3_moe"], default="deepseek_v3")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("inspect-model", help="sizes of a model, and what one rank of an EP group holds")
    p.add_argument("dir")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel width of the group")
    p.add_argument(
        "--ep-slots", type=int, default=0, help="expert slots over the group (default: one per expert)"
    )
    p.add_argument("--kv-tokens", type=int, default=0, help="KV cache tokens each rank holds")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device-memory", help="memory of one device, e.g. 80GiB: does a rank fit")
    p.add_argument("--output", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_inspect_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # our errors say what to change; no traceback for them
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
