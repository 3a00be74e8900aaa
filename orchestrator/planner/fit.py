"""Fitting the cost model's three free constants on Hopper publications, and how far each row lands.

`fit` searches `FITTED_FIELDS` (the prefill and decode all-to-all overlaps and the attention
efficiency) on a grid, coarse then fine, for the values whose worst row misses least (the largest
|log(predicted / published)|; ties by the sum of squares). It takes only publications marked
`fitted`, and only Hopper ones: a Blackwell figure sets nothing. `FITTED` in `cost.py` is its
answer on `publications.PUBLICATIONS`, rounded to two decimals; a test refits and compares.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from orchestrator.planner.cost import FITTED, FITTED_FIELDS, Efficiency
from orchestrator.planner.layout import Infeasible
from orchestrator.planner.publications import PUBLICATIONS, Publication, Row, predict
from orchestrator.planner.specs import GPUS

COARSE = {"overlap_prefill": (0.0, 1.0), "attention": (0.1, 0.9), "overlap_decode": (0.0, 1.0)}
"""The range each fitted constant is searched in: a share, or a fraction of peak."""


@dataclass(frozen=True)
class Landed:
    publication: Publication
    row: Row
    predicted: float | None
    """None: the model cannot express the row (it does not fit, say)."""

    @property
    def ratio(self) -> float | None:
        return None if self.predicted is None else self.predicted / self.row.published


def landed(publications: Iterable[Publication] = PUBLICATIONS, eff: Efficiency = FITTED) -> list[Landed]:
    out = []
    for pub in publications:
        for row in pub.rows:
            try:
                out.append(Landed(pub, row, predict(row, eff)))
            except Infeasible:
                out.append(Landed(pub, row, None))
    return out


def fit(publications: Sequence[Publication] = PUBLICATIONS, base: Efficiency = FITTED) -> Efficiency:
    """The constants of `FITTED_FIELDS` that fit the `fitted` publications best (minimax of the log
    error), to two decimals; the other fields stay `base`'s."""
    chosen = [p for p in publications if p.fitted]
    if not chosen:
        raise ValueError("no publication is marked fitted")
    for pub in chosen:
        if not pub.hopper:
            raise ValueError(f"{pub.key}: only Hopper publications (H800, H100, H200, H20) set constants")
    rows = [r for p in chosen for r in p.rows]

    def score(eff: Efficiency) -> tuple[float, float]:
        errors = []
        for row in rows:
            try:
                errors.append(abs(math.log(predict(row, eff) / row.published)))
            except Infeasible:
                return (math.inf, math.inf)
        return max(errors), sum(e * e for e in errors)

    def grid(ranges: dict[str, tuple[float, float]], step: float) -> Efficiency:
        axes = [[round(lo + k * step, 2) for k in range(round((hi - lo) / step) + 1)]
                for lo, hi in ranges.values()]  # fmt: skip
        candidates = (
            replace(base, **dict(zip(FITTED_FIELDS, values, strict=True)))
            for values in itertools.product(*axes)
        )
        return min(candidates, key=score)

    coarse = grid(COARSE, 0.05)
    fine = {
        name: (
            max(lo, round(getattr(coarse, name) - 0.04, 2)),
            min(hi, round(getattr(coarse, name) + 0.04, 2)),
        )
        for name, (lo, hi) in COARSE.items()
    }
    return grid(fine, 0.01)


def markdown(rows: Sequence[Landed]) -> list[str]:
    """A Markdown table of landed rows, each with its source, and the worst and mean error."""
    lines = ["| publication | figure | GPU | group | predicted | published | ratio |",
             "|---|---|---|---|---:|---:|---:|"]  # fmt: skip
    for x in rows:
        r, p = x.row, x.publication
        figure = f"{r.phase} {r.metric.replace('_', ' ')}" + (f" ({r.label})" if r.label else "")
        got = "cannot express" if x.predicted is None else f"{x.predicted:,.0f}"
        ratio = "-" if x.ratio is None else f"{x.ratio:.2f}"
        parallel = r.traffic.techniques.prefill_parallel.upper() if r.phase == "prefill" else "EP"
        widths = f"{parallel}{r.prefill_width if r.phase == 'prefill' else r.decode_width}"
        lines.append(f"| [{p.key}]({p.url}) | {figure} | {GPUS[r.gpu].name} | {widths} | {got} | "
                     f"{r.published:,.0f} | {ratio} |")  # fmt: skip
    errors = [abs(x.ratio - 1) if x.ratio is not None else math.inf for x in rows]
    lines.append(
        f"\nworst: {max(errors):.0%} off; mean |error| {sum(errors) / len(errors):.0%} over {len(rows)} rows"
    )
    return lines
