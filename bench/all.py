"""`make bench`: run every benchmark of the project and rewrite its results in docs/benchmarks.md.

    .venv/bin/python bench/all.py [--only NAME ...] [--doc docs/benchmarks.md] [--list]

Each benchmark's results sit in the document between `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->`; a run replaces exactly that block with a line naming the machine, the
date and the baseline of the benchmark's ratios, then the script's output (a markdown table as it
is, every other run of lines fenced). The prose around a block is left alone: it reads the figures of the
run that wrote it. A benchmark that fails gets a block saying so (its exit status and last error
line) and the runner exits non-zero after the rest have run. Only what a benchmark itself prints
is its result: its child processes' output (workers, gateways) goes to stderr. Benchmarks run
one after another (one torch thread each: this machine's cores are shared).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = {  # name: (arguments after the script, baseline of its ratios)
    "engine": ([], "transformers' generate on the same tiny model, same process"),
    "handoff": ([], "one raw Mooncake write of the same bytes between two bare engines; monolithic TTFT"),
    "dispatch": ([], "a bare all_to_all_single of the same rows; EP1 decode"),
    "ep_pair": (["--rounds", "1"], "none without --baseline (absolute figures)"),
    "load": ([], "safetensors' get_tensor of the same checkpoint"),
    "pools": ([], "the same pools at a steady size"),
    "router": ([], "the workers' gRPC without a router; SMG in PD mode"),
    "router_sglang": (["--workers", "sglang"], "SGLang's servicers' gRPC without a router; SMG in PD mode"),
    "prefix": ([], "the same cluster with the prefix cache off"),
    "eplb": ([], "DeepSeek EPLB's algorithm (rebuilt), and an upper bound"),
    "planner": ([], "the published figures: 2 fitted Hopper publications, 6 held out (4 on GB200)"),
    "chaos": ([], "an undisturbed run of the same greedy requests (their texts)"),
}
SCRIPTS = {"router_sglang": "router"}
"""A block that another benchmark's script writes (with other arguments); the rest are `bench/NAME.py`."""
RESULTS_ONLY = """
import os, runpy, sys
results = os.dup(1)  # the benchmark's own prints are its results;
os.dup2(2, 1)  # what its child processes write to their stdout goes to stderr
sys.stdout = os.fdopen(results, "w", buffering=1)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""
BLOCK = re.compile(r"<!-- bench:(?P<name>[a-z_]+)[^>]*-->\n.*?<!-- /bench:(?P=name) -->\n", re.S)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    torch = importlib.metadata.version("torch")
    python = platform.python_version()
    return f"{os.cpu_count()}-core {platform.machine()} ({cpu}), Python {python}, torch {torch}"


def block(name: str, output: str, baseline: str, when: str, where: str, status: int, seconds: float) -> str:
    head = f"<!-- bench:{name} (rewritten by `make bench`) -->\n"
    if status:
        last = (output.strip().splitlines() or ["(no output)"])[-1]
        body = f"**Not run to the end** on {when} (exit {status} after {seconds:.0f} s): `{last}`\n"
    else:
        shown = _markdown(output)
        body = f"`make bench`, {when}, {where}, {seconds:.0f} s. Baseline of the ratios: {baseline}.\n"
        body += f"\n{shown}\n"
    return f"{head}{body}<!-- /bench:{name} -->\n"


def _markdown(output: str) -> str:
    """The output's markdown tables as they are, every other run of lines fenced."""
    runs: list[tuple[bool, list[str]]] = []
    for line in output.strip().splitlines():
        table = line.startswith("|")
        if runs and runs[-1][0] == table:
            runs[-1][1].append(line)
        else:
            runs.append((table, [line]))
    parts = []
    for table, lines in runs:
        text = "\n".join(lines).strip("\n")
        if text.strip():
            parts.append(text if table else f"```\n{text}\n```")
    return "\n\n".join(parts)


def rewrite(doc: str, blocks: dict[str, str]) -> str:
    """`doc` with each named block replaced; a block the document lacks is appended."""
    done = set()

    def swap(m: re.Match) -> str:
        name = m.group("name")
        if name in blocks:
            done.add(name)
            return blocks[name]
        return m.group(0)

    out = BLOCK.sub(swap, doc)
    for name in blocks.keys() - done:
        out += f"\n## `bench/{name}.py`\n\n{blocks[name]}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run these benchmarks only")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and their baselines")
    a = ap.parse_args()
    if a.list:
        for name, (args, baseline) in BENCHES.items():
            print(f"{name:13} bench/{SCRIPTS.get(name, name)}.py {' '.join(args)}  (baseline: {baseline})")
        return 0
    when, where = dt.date.today().isoformat(), machine()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    blocks, failed = {}, []
    for name in a.only or BENCHES:
        args, baseline = BENCHES[name]
        path = f"bench/{SCRIPTS.get(name, name)}.py"
        print(f"== {path} {' '.join(args)}", flush=True)
        start = time.monotonic()
        script = [sys.executable, "-c", RESULTS_ONLY, str(ROOT / path), *args]
        run = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - start
        print(run.stdout, end="", flush=True)
        output = run.stdout if not run.returncode else run.stdout + run.stderr
        blocks[name] = block(name, output, baseline, when, where, run.returncode, seconds)
        if run.returncode:
            failed.append(name)
        a.doc.write_text(rewrite(a.doc.read_text(), {name: blocks[name]}))  # each result lands at once
    print(f"rewrote {len(blocks)} block(s) of {a.doc}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
