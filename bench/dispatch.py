"""EP token exchange: dispatch + combine vs a bare all_to_all_single of the same bytes, host
syncs per decode step for each backend, and decode tokens/s of one instance at EP1 vs EP2.

    OMP_NUM_THREADS=1 .venv/bin/python bench/dispatch.py

Part 1 (2 ranks, gloo): DeepSeek-V3 shapes — hidden 7168, top-8 of 256 experts (128 slots per
rank), bf16 activations — for decode-sized (128 tokens per rank) and prefill-sized (2048 tokens
per rank) batches, once with both ranks on one node and once as two nodes (127.0.0.1 and
127.0.0.2, meeting at node 0's store as a multi-node instance does). Achieved bandwidth = bytes
that cross ranks / time. The baseline sends exactly those rows with the same split sizes, once
each way, on the same group.

Part 2: host synchronisations in the decode steps of an EP2 engine (tiny DeepSeek-V3 at hidden
256, bf16), per MoE layer and per step, counted by `tests.host_syncs.HostSyncCounter` (the
calls that would stall a GPU's host), for the `torch` backend and for `deepep` (its expanded
layout, run here against the contract double in tests/doubles).

Part 3: the tiny DeepSeek-V3 model, 16 decode requests; EP1 = one rank with all of them, EP2 =
two ranks (data-parallel attention) with 8 each. Decode tokens/s isolated as in bench/engine.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from services.engine import Engine, SamplingParams
from services.ep import ExpertLoadRecorder, ExpertParallel, ExpertPlacement, create
from services.tools.tiny import make_tiny_model
from tests.ranks import run_ranks
from tests.services.ep.test_deepep_engine import decode_rank as synced_decode_rank

HIDDEN, EXPERTS, TOPK = 7168, 256, 8


def exchange(rank: int, world: int, tokens: int, repeats: int, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    d = create("torch")
    spr = EXPERTS // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
    slots = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOPK] for _ in range(tokens)])
    weights = torch.rand(tokens, TOPK, generator=g)

    def ours() -> torch.Tensor:
        got = d.dispatch(x, slots, weights, spr)
        return d.combine(got.x, got.handle)

    got = d.dispatch(x, slots, weights, spr)
    send_counts = list(got.handle[1])
    recv_counts = list(got.handle[2])
    rows = x[got.handle[0]]
    back = torch.empty(sum(recv_counts), HIDDEN, dtype=dtype)

    def bare() -> None:
        recv = torch.empty(sum(recv_counts), HIDDEN, dtype=dtype)
        dist.all_to_all_single(recv, rows, recv_counts, send_counts)
        dist.all_to_all_single(rows, back, send_counts, recv_counts)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            dist.barrier()
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    cross = (sum(send_counts) - send_counts[rank]) * HIDDEN * x.element_size() * 2  # there and back
    return {"ours": best(ours), "bare": best(bare), "cross_bytes": cross}


def decode_rank(rank: int, world: int, model_dir: str, prompts: list[list[int]], new: int) -> float:
    dispatcher = create("torch") if world > 1 else None

    def parallel(cfg):
        placement = ExpertPlacement.default(len(cfg.moe_layers), cfg.num_experts, cfg.num_experts, world)
        return ExpertParallel(
            placement, rank, dispatcher, ExpertLoadRecorder(len(cfg.moe_layers), cfg.num_experts)
        )

    engine = Engine.from_pretrained(model_dir, parallel=parallel)
    mine = prompts[rank::world]

    def run(n: int) -> float:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        if dispatcher is not None:
            dist.barrier()
        t = time.perf_counter()
        for p in mine:
            engine.add_request(p, params)
        while True:
            engine.step()
            if engine.idle:
                break
        return time.perf_counter() - t

    run(4)
    t1, tn = min(run(1) for _ in range(2)), min(run(new) for _ in range(2))
    return len(mine) * (new - 1) / (tn - t1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    print(
        f"dispatch + combine vs bare all_to_all_single, 2 ranks, gloo, hidden {HIDDEN}, "
        f"top-{TOPK} of {EXPERTS}"
    )
    print(f"{'nodes':>6}{'tokens/rank':>12}{'MB crossing':>13}{'ours GB/s':>11}{'bare GB/s':>11}{'ratio':>8}")
    for nodes in (1, 2):
        for tokens in (128, 2048):
            res = run_ranks(2, exchange, tokens, args.repeats, args.dtype, nodes=nodes)
            ours = max(r["ours"] for r in res)
            bare = max(r["bare"] for r in res)
            nbytes = sum(r["cross_bytes"] for r in res)
            print(
                f"{nodes:>6}{tokens:>12}{nbytes / 1e6:>13.1f}{nbytes / ours / 1e9:>11.2f}"
                f"{nbytes / bare / 1e9:>11.2f}{bare / ours:>8.2f}"
            )

    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_model(f"{tmp}/m256", "deepseek_v3", overrides={"hidden_size": 256}))
        print("host syncs in decode steps, EP2, 2 MoE layers (mean over steps of both ranks)")
        print(f"{'backend':>28}{'steps':>7}{'per MoE layer':>15}{'per step':>10}")
        for backend in ("torch", "deepep"):
            ranks = run_ranks(2, synced_decode_rank, model, backend, [4, 4])
            mode = "expanded" if backend == "deepep" else "normal"
            steps = [s for r in ranks for s in r["syncs"][mode]]  # decode-only steps
            label = f"{backend} ({mode})" + (" [double]" if backend == "deepep" else "")
            print(
                f"{label:>28}{len(steps):>7}{sum(a for a, _ in steps) / len(steps):>15.1f}"
                f"{sum(b for _, b in steps) / len(steps):>10.1f}"
            )

    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_model(f"{tmp}/m", "deepseek_v3"))
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, 480, (16, 32), generator=g).tolist()
        ep1 = sum(run_ranks(1, decode_rank, model, prompts, 48))
        ep2 = sum(run_ranks(2, decode_rank, model, prompts, 48))
    print(
        f"decode tok/s, tiny DeepSeek-V3, 16 requests: EP1 {ep1:.1f}, EP2 {ep2:.1f} (ratio {ep2 / ep1:.2f})"
    )


if __name__ == "__main__":
    main()
