"""The capacity planner against the published figures it is calibrated on, and how fast it answers.

    .venv/bin/python bench/planner.py [--repeats 5]

Baseline of each ratio: the published figure (DeepSeek's day-6 inference-system overview; LMSYS's
"large-scale EP on 96 H100 GPUs" blog, May 2025, and its tables of DeepSeek's profile). Rows
marked "check" are not fitted: they show how far the same constants land from figures measured
under other conditions. Timing: a full `moeserve plan` search with its crossover, in process
(best of `--repeats`) and as the command (one run, with interpreter start-up).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator.planner.plan import Traffic, evaluate, plan
from orchestrator.planner.specs import GPUS, MODELS

DS = Traffic(cache_hit=0.563)
SG = Traffic(input_len=2000, output_len=100, length_cv=0)
AS_STATED = Traffic(input_len=2000)  # the command for SGLang's case: other inputs at defaults
PROFILE = Traffic(input_len=4096, length_cv=0, balancedness=1.0)  # DeepSeek's profile: even load
CASES = [  # (case, gpu, prefill EP, decode EP, traffic, which, published, fitted)
    ("DeepSeek production", "h800", 32, 144, DS, "input", 73_700, True),
    ("DeepSeek production", "h800", 32, 144, DS, "output", 14_800, True),
    ("SGLang 96xH100, 2K inputs", "h100", 24, 72, SG, "input", 52_300, True),
    ("SGLang 96xH100, 2K inputs", "h100", 24, 72, SG, "output", 22_300, True),
    ("SGLang EP32, 1K inputs", "h100", 32, 72, replace(SG, input_len=1000), "input", 57_674, False),
    ("SGLang EP32, 4K inputs", "h100", 32, 72, replace(SG, input_len=4096), "input", 50_302, False),
    ("DeepSeek profile, 4K inputs", "h800", 32, 144, PROFILE, "input", 62_713, False),
    ("SGLang's case as the issue states it", "h100", 24, 72, AS_STATED, "input", 52_300, False),
    ("SGLang's case as the issue states it", "h100", 24, 72, AS_STATED, "output", 22_300, False),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    model = MODELS["deepseek-v3"]
    print("| case | GPU | prefill EP / decode EP | tokens/s per node | published | ratio | |")
    print("|---|---|---|---:|---:|---:|---|")
    for case, gpu, p, d, traffic, which, published, fitted in CASES:
        layout = evaluate(model, GPUS[gpu], traffic, p, d)
        got = layout.input_tokens_per_s_per_node if which == "input" else layout.output_tokens_per_s_per_node
        kind = "fitted" if fitted else "check"
        print(f"| {case}, {which} | {gpu.upper()} | {p} / {d} | {got:,.0f} | {published:,} | "
              f"{got / published:.2f} | {kind} |")  # fmt: skip
    best = float("inf")
    for _ in range(a.repeats):
        start = time.perf_counter()
        result = plan(model, GPUS["h800"], replace(DS, request_rate=100))
        best = min(best, time.perf_counter() - start)
    start = time.perf_counter()
    cli = Path(sys.executable).with_name("moeserve")
    args = ["plan", "--model", "deepseek-v3", "--gpu", "h800", "--request-rate", "100", "--output", "json"]
    run = subprocess.run([str(cli), *args], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    rec = result["recommendation"]
    print(f"\nplan, DeepSeek-V3 on H800 at 100 requests/s: {len(result['layouts'])} layouts; recommended "
          f"prefill EP{rec.prefill_ep} x{rec.prefill_groups} / "
          f"decode EP{rec.decode_ep} x{rec.decode_groups}; "
          f"crossover {result['crossover_request_rate']:.3g} requests/s")  # fmt: skip
    print(f"search and crossover {best * 1e3:.0f} ms in process; `moeserve plan` {wall:.2f} s as a command "
          f"({len(run.stdout)} bytes of JSON)")  # fmt: skip


if __name__ == "__main__":
    main()
