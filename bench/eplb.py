"""Expert placement at DeepSeek-V3 scale: our planner against DeepSeek EPLB's algorithm.

    OMP_NUM_THREADS=1 .venv/bin/python bench/eplb.py [--tokens 16384] [--skews 0 0.3 0.6 1.0 1.4]

Synthetic loads: 58 MoE layers x 256 experts in 8 groups; per layer a Zipf(s) popularity over a
random expert order; each window routes `--tokens` tokens DeepSeek-style (Gumbel-perturbed log
popularity as scores; a group scores the sum of its best two experts; top-4 groups, then the
top-8 experts within them). Two deployments: prefill 288 slots / 32 GPUs / 4 nodes
(hierarchical policy, as DeepSeek's, and our locality policy), decode 288 slots / 144 GPUs / 18
nodes (global policy).

Per case: balancedness (mean GPU load / max GPU load, averaged over layers) on the planning
window and on a fresh window of the same popularity, with each expert's load split evenly over its
replicas; the same on the planning window with every token sent where the engine's
`ExpertPlacement.route` sends it (routed); distinct nodes per token under that route; the share of slots
an incremental re-plan on the fresh window changes, and its balancedness minus a full re-plan's,
on that window and on a third, held-out one;
planner time for all 58 layers on one thread. "deepseek" is DeepSeek EPLB's algorithm (the same
greedy rules, packing one layer at a time in Python, without spreading replicas), rebuilt here
from its published description; for decode, an upper bound on any placement's balancedness with
these replica counts is shown (mean load / max(mean load, heaviest expert / its best split)).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from services.ep.placement import ExpertPlacement
from services.eplb import balancedness, rebalance_experts
from services.eplb.greedy import hierarchical, replicate

LAYERS, EXPERTS, GROUPS, TOPK, TOPK_GROUPS = 58, 256, 8, 8, 4
DEPLOYMENTS = {"prefill": (288, 4, 32), "decode": (288, 18, 144)}  # slots, nodes, GPUs


def popularity(s: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(EXPERTS, generator=g) for _ in range(LAYERS)]) + 1
    return ranks.float() ** -s  # [L, E]


def route(pop: torch.Tensor, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [L, E], chosen experts [L, tokens, 8]) of one window."""
    g = torch.Generator().manual_seed(seed)
    weight, chosen = torch.zeros(LAYERS, EXPERTS), []
    for layer in range(LAYERS):
        u = torch.rand(tokens, EXPERTS, generator=g).clamp_min(1e-20)
        scores = pop[layer].log() - (-u.log()).log()  # Gumbel-perturbed log popularity
        grouped = scores.view(tokens, GROUPS, -1)
        best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(TOPK_GROUPS, dim=-1).indices
        keep = torch.zeros(tokens, GROUPS, dtype=torch.bool).scatter_(1, best_groups, True)
        masked = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(tokens, EXPERTS)
        ids = masked.topk(TOPK, dim=-1).indices
        weight[layer] = torch.bincount(ids.flatten(), minlength=EXPERTS).float()
        chosen.append(ids)
    return weight, torch.stack(chosen)


def routed(phy2log: torch.Tensor, chosen: torch.Tensor, nodes: int, gpus: int) -> tuple[float, float]:
    """(balancedness, distinct nodes per token) of a window's tokens sent to slots by the engine's
    route (`ExpertPlacement.route`, which knows the nodes)."""
    placement = ExpertPlacement(EXPERTS, gpus, phy2log, nodes)
    slots = phy2log.shape[1]
    balance = spread = 0.0
    for layer in range(LAYERS):
        picked = placement.route(layer, chosen[layer])  # [T, K] slots
        load = torch.bincount((picked // (slots // gpus)).flatten(), minlength=gpus).float()
        balance += float(load.mean() / load.max())
        node = (picked // (slots // nodes)).sort(dim=1).values
        spread += float((1 + (node[:, 1:] != node[:, :-1]).sum(1)).float().mean())
    return balance / LAYERS, spread / LAYERS


def loop_pack(weight: torch.Tensor, num_packs: int, kinds: torch.Tensor | None = None):
    """DeepSeek EPLB's packing: one row at a time in Python (it does not spread replicas)."""
    rows, n = weight.shape
    per = n // num_packs
    where, rank = torch.empty(rows, n, dtype=torch.long), torch.empty(rows, n, dtype=torch.long)
    for r in range(rows):
        load, used = [0.0] * num_packs, [0] * num_packs
        for item in weight[r].sort(descending=True, stable=True).indices.tolist():
            target = min((p for p in range(num_packs) if used[p] < per), key=load.__getitem__)
            where[r, item], rank[r, item] = target, used[target]
            load[target] += float(weight[r, item])
            used[target] += 1
    return where, rank


def deepseek(weight: torch.Tensor, slots: int, nodes: int, gpus: int) -> torch.Tensor:
    if GROUPS % nodes == 0:
        return hierarchical(weight, slots, GROUPS, nodes, gpus, pack_fn=loop_pack)
    return hierarchical(weight, slots, 1, 1, gpus, pack_fn=loop_pack)


def bound(weight: torch.Tensor, slots: int, gpus: int) -> float:
    """An upper bound on any placement's balancedness: the max GPU load is at least the mean, and
    at least the heaviest slot's load under the replication that makes it lightest (the greedy
    replication is optimal for that), since some GPU holds that slot."""
    heaviest = (weight / replicate(weight, slots)[1]).max(1).values
    mean = weight.sum(1) / gpus
    return float((mean / torch.maximum(mean, heaviest)).mean())


def timed(fn, *args) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--skews", type=float, nargs="+", default=[0.0, 0.3, 0.6, 1.0, 1.4])
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| deployment | s | planner | balancedness (plan window) | (fresh window) | (routed) | nodes/token "
          "| incremental: slots changed | its balancedness − full re-plan's (fresh / held-out) "
          "| noise-aware: slots changed | its balancedness − full re-plan's | planner s |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in a.skews:
        pop = popularity(s, seed=int(s * 100) + 1)
        w1, chosen1 = route(pop, a.tokens, seed=1)
        w2, _ = route(pop, a.tokens, seed=2)
        w3, _ = route(pop, a.tokens, seed=3)  # held out: neither plan saw it
        for name, (slots, nodes, gpus) in DEPLOYMENTS.items():
            shape = (slots, GROUPS, nodes, gpus)
            policies = {"moeserve": "auto", "moeserve locality": "locality"} if name == "prefill" else {}
            rows = {label: (*timed(lambda w, p=p, sh=shape: rebalance_experts(w, *sh, p)[0], w1), p)
                    for label, p in (policies or {"moeserve": "auto"}).items()}  # fmt: skip
            rows["deepseek"] = (*timed(deepseek, w1, slots, nodes, gpus), None)
            for label, (plan, t, policy) in rows.items():
                extra = "— | — | — | —"
                if policy is not None:
                    extra = incremental_columns(w2, w3, plan, shape, policy, gpus)
                row = [f"{balancedness(w, plan, gpus):.4f}" for w in (w1, w2)]
                balance, spread = routed(plan, chosen1, nodes, gpus)
                row += [f"{balance:.4f}", f"{spread:.2f}", extra, f"{t:.3f}"]
                print(f"| {name} | {s} | {label} | " + " | ".join(row) + " |")
            if name == "decode":
                print(f"| {name} | {s} | upper bound | {bound(w1, slots, gpus):.4f} | | | | | | | | |")


def incremental_columns(w2, w3, plan, shape, policy, gpus) -> str:
    """Slots an incremental re-plan on w2 changes and its balancedness minus a full re-plan's (on
    w2 and the held-out w3), plain and noise-aware."""
    full = rebalance_experts(w2, *shape, policy)[0]
    out = []
    for counts in (False, True):
        inc = rebalance_experts(w2, *shape, policy, plan, counts=counts)[0]
        gaps = [balancedness(w, inc, gpus) - balancedness(w, full, gpus) for w in (w2, w3)]
        out.append(f"{float((inc != plan).float().mean()):.1%} | {gaps[0]:+.4f} / {gaps[1]:+.4f}")
    return " | ".join(out)


if __name__ == "__main__":
    main()
