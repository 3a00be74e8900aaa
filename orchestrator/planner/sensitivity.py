"""How far each knob no publication states moves the planner's answer (`moeserve plan --sensitivity`).

The knobs: the spread of request lengths (`length_cv`), EPLB's balancedness, the prefix-cache hit
rate, the shares of the all-to-all two micro-batches hide in prefill and decode (fitted: tried at
half and about one and a half times the fit), the HBM share the engine may use (`memory_fraction`)
and the decode batch cap (`max_decode_batch`). Each is set in turn to the values below, the rest
left at their defaults, and the cheapest layout is found again: its widths, and its cost per
output token and output per node against the defaults' answer. (No crossover is searched.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from orchestrator.planner.cost import FITTED, Efficiency
from orchestrator.planner.layout import Infeasible, Layout, Traffic
from orchestrator.planner.plan import _cheapest, _feasible
from orchestrator.planner.specs import GpuSpec, ModelSpec


def _around(fitted: float) -> tuple[float, ...]:
    return (round(fitted / 2, 2), fitted, round(min(1.0, fitted * 1.5), 2))


KNOBS: dict[str, tuple[str, tuple[float, ...], str]] = {
    "length_cv": ("traffic", (0.0, 0.5, 1.0, 2.0), "requests all alike (0) to a heavy tail (2)"),
    "balancedness": ("traffic", (0.55, 0.77, 0.85, 0.95), "the EPLB bench measures 0.77 and 0.55 at EP144"),
    "cache_hit": ("traffic", (0.0, 0.3, 0.563), "DeepSeek reports 56.3% for its service"),
    "overlap_prefill": ("eff", _around(FITTED.overlap_prefill), f"fitted {FITTED.overlap_prefill}"),
    "overlap_decode": ("eff", _around(FITTED.overlap_decode), f"fitted {FITTED.overlap_decode}"),
    "memory_fraction": ("eff", (0.85, 0.9, 0.95), "SGLang's --mem-fraction-static is about 0.8-0.9"),
    "max_decode_batch": ("techniques", (128, 256, 512), "SGLang's largest default CUDA graph is 256"),
}
"""knob -> (where it lives, the values tried, why those)."""


def sensitivity(
    model: ModelSpec, gpu: GpuSpec, traffic: Traffic, prefill_eps: Sequence[int], decode_eps: Sequence[int],
    eff: Efficiency = FITTED,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per knob and value: the cheapest layout then, against the defaults' cheapest."""
    base = _answer(model, gpu, traffic, prefill_eps, decode_eps, eff)
    if base is None:
        raise Infeasible("no layout serves the defaults: nothing to compare with")
    rows = []
    for knob, (where, values, why) in KNOBS.items():
        holder = {"traffic": traffic, "eff": eff, "techniques": traffic.techniques}[where]
        default = getattr(holder, knob)
        for value in values:
            changed: dict[str, Any] = {knob: type(default)(value)}  # a number field of the holder
            t = replace(traffic, **changed) if where == "traffic" else traffic
            if where == "techniques":
                t = replace(traffic, techniques=replace(traffic.techniques, **changed))
            e = replace(eff, **changed) if where == "eff" else eff
            best = _answer(model, gpu, t, prefill_eps, decode_eps, e)
            row: dict[str, Any] = {"knob": knob, "value": value, "default": value == default, "why": why}
            if best is None:
                rows.append({**row, "layout": None, "cost_ratio": None, "output_per_node_ratio": None})
                continue
            cost = best.usd_per_million_output_tokens / base.usd_per_million_output_tokens
            output = best.output_tokens_per_s_per_node / base.output_tokens_per_s_per_node
            rows.append({**row, "layout": f"{best.prefill_ep}/{best.decode_ep}", "cost_ratio": round(cost, 3),
                         "output_per_node_ratio": round(output, 3)})  # fmt: skip
    return rows


def _answer(model: ModelSpec, gpu: GpuSpec, traffic: Traffic, prefill_eps: Sequence[int],
            decode_eps: Sequence[int], eff: Efficiency) -> Layout | None:  # fmt: skip
    layouts = _feasible(model, gpu, traffic, prefill_eps, decode_eps, eff)[0]
    return _cheapest(layouts) if layouts else None
