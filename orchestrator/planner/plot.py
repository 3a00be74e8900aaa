"""`moeserve plan --plot FILE.svg`: cost per million output tokens against request rate, one
curve per decode EP width (each with its cheapest prefill width), on log-log axes. Plain SVG."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from xml.sax.saxutils import escape

from orchestrator.planner.layout import Infeasible, Traffic
from orchestrator.planner.plan import evaluate
from orchestrator.planner.specs import GpuSpec, ModelSpec

W, H, PAD = 720, 440, 60
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def cost_curves(
    model: ModelSpec, gpu: GpuSpec, traffic: Traffic, prefill_eps: Sequence[int], decode_eps: Sequence[int]
) -> str:
    rates = [10 ** (k / 8) for k in range(-8, 33)]  # 0.1 .. 10,000 requests/s
    series: dict[int, list[tuple[float, float]]] = {}
    for d in decode_eps:
        points = []
        for rate in rates:
            costs = []
            for p in prefill_eps:
                try:
                    costs.append(evaluate(model, gpu, replace(traffic, request_rate=rate), p, d))
                except Infeasible:
                    continue
            if costs:
                points.append((rate, min(x.usd_per_million_output_tokens for x in costs)))
        if points:
            series[d] = points
    if not series:
        raise Infeasible("no layout to plot")
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = math.log10(rates[0]), math.log10(rates[-1])
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    y1 = max(y1, y0 + 1)

    def px(x: float, y: float) -> tuple[float, float]:
        return (PAD + (math.log10(x) - x0) / (x1 - x0) * (W - 2 * PAD),
                H - PAD - (math.log10(y) - y0) / (y1 - y0) * (H - 2 * PAD))  # fmt: skip

    title = f"{model.name} on {gpu.name}: USD per million output tokens against request rate"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle">{escape(title)}</text>',
    ]
    for k in range(int(x0), int(x1) + 1):  # decades on x
        x, _ = px(10**k, 10**y0)
        out.append(f'<line x1="{x:.1f}" y1="{PAD}" x2="{x:.1f}" y2="{H - PAD}" stroke="#ddd"/>')
        out.append(f'<text x="{x:.1f}" y="{H - PAD + 16}" text-anchor="middle">{10**k:g}</text>')
    for k in range(y0, y1 + 1):
        _, y = px(10**x0, 10**k)
        out.append(f'<line x1="{PAD}" y1="{y:.1f}" x2="{W - PAD}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{PAD - 6}" y="{y + 4:.1f}" text-anchor="end">{10**k:g}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 16}" text-anchor="middle">requests/s</text>')
    for i, (d, pts) in enumerate(sorted(series.items())):
        color = COLORS[i % len(COLORS)]
        path = " ".join(
            f"{'M' if j == 0 else 'L'}{a:.1f},{b:.1f}" for j, (a, b) in enumerate(px(*p) for p in pts)
        )
        out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{W - PAD + 4}" y="{PAD + 16 * i}" fill="{color}">EP{d}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
