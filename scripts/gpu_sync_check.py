"""Decode steps on a GPU under `torch.cuda.set_sync_debug_mode("error")`: a step may wait for the device
once, to copy its sampled tokens to the host (`services.engine.sampling.to_host`); any other host
synchronisation in the step raises. Part of scripts/gpu_check.sh.

    python scripts/gpu_sync_check.py [--arch deepseek_v3|qwen3_moe] [--steps 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

import services.engine.sampling as sampling
from services.engine import Engine, SamplingParams
from services.tools.tiny import make_tiny_model


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="deepseek_v3", choices=["deepseek_v3", "qwen3_moe"])
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(f"{tmp}/m", args.arch)
        engine = Engine.from_pretrained(model_dir, device="cuda", dtype="bfloat16", page_size=16)
        greedy = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        sampled = SamplingParams(
            max_tokens=64, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True, logprobs=2
        )
        for i, p in enumerate([greedy, sampled, greedy]):
            engine.add_request(list(range(3 + i, 40 + i)), p)
        while engine.scheduler.waiting or any(r.phase.value == "prefill" for r in engine.scheduler.running):
            engine.step()  # prefill, with its first-use allocations, outside the checked steps
        engine.step()
        copy = sampling.to_host

        def allowed(*tensors: torch.Tensor) -> list:  # type: ignore[type-arg]
            torch.cuda.set_sync_debug_mode("default")
            try:
                return copy(*tensors)
            finally:
                torch.cuda.set_sync_debug_mode("error")

        sampling.to_host = allowed
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(args.steps):
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            sampling.to_host = copy
    print(f"{args.arch}: {args.steps} decode steps, no host sync but the sampled tokens' copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
