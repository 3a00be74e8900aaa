"""Weight loading: time and bytes read per rank at EP1/EP2/EP4 vs reading the shards with safetensors.

    OMP_NUM_THREADS=1 .venv/bin/python bench/load.py [--gb 1.0]

A synthetic DeepSeek-V3-shaped checkpoint (MLA, 64 routed experts of hidden 1024, one dense
layer; bf16, sharded at 256 MB) of about `--gb` GB is written to a temporary directory, plus
its FP8 block-quantized form. Before every timed read the shards are dropped from the page cache
(`posix_fadvise(DONTNEED)`), so each run reads from the disk. Baseline: one process reading
every tensor of the checkpoint once with `safetensors.safe_open(...).get_tensor`, in the same
run and in a fresh process as a rank is (a fresh process pays for zeroing the pages it fills).
Ours: `load_model` (bf16 engine weights) on each of W concurrent rank processes, each
reading its dense weights and its experts. Bandwidth = bytes the rank needs / its load time;
ratio = that / the baseline's bandwidth (target >= 0.8); "MB/s (all)" adds the ranks of a
group up (they share this machine's disk and cores, as ranks of one node share its disk). Each
row is the best of `--repeats` cold runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from services.ep import ExpertParallel, ExpertPlacement, create
from services.models import load_model
from services.tools.synthetic import random_config, write_random_checkpoint
from tests.ranks import run_ranks


def drop_cache(model_dir: Path) -> None:
    for f in model_dir.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def safetensors_read(rank: int, world: int, model_dir: Path) -> dict:
    """The baseline, in a fresh process like a rank's: every tensor once through safetensors."""
    start, nbytes = time.perf_counter(), 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = st.get_tensor(name)
                nbytes += t.numel() * t.element_size()
    return {"read": nbytes, "seconds": time.perf_counter() - start}


def load_rank(rank: int, world: int, model_dir: str) -> dict:
    torch.distributed.barrier()  # every rank starts together, as an instance's ranks do
    dispatcher = create("torch") if world > 1 else None

    def parallel(cfg):
        placement = ExpertPlacement.default(len(cfg.moe_layers), cfg.num_experts, cfg.num_experts, world)
        return ExpertParallel(placement, rank, dispatcher)

    start = time.perf_counter()
    model, _ = load_model(model_dir, dtype=torch.bfloat16, parallel=parallel)
    return {"seconds": time.perf_counter() - start, "read": model.load_report.bytes_read}


def best_of(repeats: int, model_dir: Path, fn, *args):
    """The run whose slowest rank was fastest, each from a cold page cache."""
    runs = []
    for _ in range(repeats):
        drop_cache(model_dir)
        runs.append(run_ranks(*args[:1], fn, *args[1:]))
    return min(runs, key=lambda ranks: max(r["seconds"] for r in ranks))


def run(model_dir: Path, label: str, base_bw: float, worlds: tuple[int, ...], repeats: int) -> None:
    for world in worlds:
        ranks = best_of(repeats, model_dir, load_rank, world, str(model_dir))
        slowest = max(r["seconds"] for r in ranks)
        per_rank = [r["read"] / r["seconds"] / 1e6 for r in ranks]
        mean_read = sum(r["read"] for r in ranks) / world
        print(
            f"{label:>6}{f'EP{world}':>6}{mean_read / 1e6:>12.0f}{slowest:>10.2f}"
            f"{min(per_rank):>14.0f}{sum(r['read'] for r in ranks) / slowest / 1e6:>13.0f}"
            f"{min(per_rank) * 1e6 / base_bw:>8.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0, help="checkpoint size to write")
    ap.add_argument("--repeats", type=int, default=3, help="runs per row; the best is shown")
    args = ap.parse_args()
    per_moe_layer = 64 * 3 * 1024 * 512 * 2  # 64 experts of gate, up, down at hidden 1024
    layers = max(2, round(args.gb * 1e9 / per_moe_layer))
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        config = random_config(hidden=1024, experts=64, layers=layers)
        bf16 = write_random_checkpoint(Path(tmp) / "bf16", config)
        fp8 = write_random_checkpoint(Path(tmp) / "fp8", config, fp8=True)
        print(f"checkpoint: DeepSeek-V3-shaped, {layers} layers, 64 experts, hidden 1024 (bf16 and FP8)")
        head = ("format", 6), ("group", 6), ("MB/rank", 12), ("seconds", 10), ("MB/s (rank)", 14)
        print("".join(f"{h:>{w}}" for h, w in (*head, ("MB/s (all)", 13), ("ratio", 8))))
        for label, model_dir, worlds in (("bf16", bf16, (1, 2, 4)), ("fp8", fp8, (1, 4))):
            (base,) = best_of(args.repeats, model_dir, safetensors_read, 1, model_dir)
            nbytes, secs = base["read"], base["seconds"]
            base_bw = nbytes / secs
            print(
                f"{label:>6}{'st':>6}{nbytes / 1e6:>12.0f}{secs:>10.2f}{base_bw / 1e6:>14.0f}"
                f"{'':>13}{1:>8.2f}"
            )
            run(model_dir, label, base_bw, worlds, args.repeats)


if __name__ == "__main__":
    main()
