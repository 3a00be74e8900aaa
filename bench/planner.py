"""The capacity planner against published deployments: the rows it is fitted on, the rows held out
from the fit, and how fast it answers.

    .venv/bin/python bench/planner.py [--repeats 5]

Baseline of each ratio: the published figure, in the publication's own unit (per node of 8 GPUs
for Hopper, per GPU for GB200). Fitted rows (Hopper only) set the cost model's three free
constants (`orchestrator/planner/fit.py`); held-out rows set nothing and show how far the model
predicts. Each row's conditions are in `orchestrator/planner/publications.py`, with what the
publication leaves unstated. Timing: a full `moeserve plan` search with its crossover, in process
(best of `--repeats`) and as the command (one run, with interpreter start-up).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator.planner.cost import FITTED, FITTED_FIELDS
from orchestrator.planner.fit import fit, landed, markdown
from orchestrator.planner.layout import Traffic
from orchestrator.planner.plan import plan
from orchestrator.planner.specs import GPUS, MODELS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    rows = landed()
    print("Fitted rows (Hopper; these set the constants)\n")
    print("\n".join(markdown([x for x in rows if x.publication.fitted])))
    print("\nHeld-out rows (checks: no constant is fitted on them)\n")
    print("\n".join(markdown([x for x in rows if not x.publication.fitted])))
    start = time.perf_counter()
    refit = fit()
    fit_s = time.perf_counter() - start
    values = ", ".join(f"{k}={getattr(refit, k)}" for k in FITTED_FIELDS)
    print(f"\nrefit on the fitted rows: {values} ({'same as' if refit == FITTED else 'DIFFERS from'} FITTED, "
          f"{fit_s:.1f} s)")  # fmt: skip
    model = MODELS["deepseek-v3"]
    best = float("inf")
    for _ in range(a.repeats):
        start = time.perf_counter()
        result = plan(model, GPUS["h800"], Traffic(request_rate=100, cache_hit=0.563))
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
