"""Layouts for a traffic profile: how many groups of which EP width per role, what they deliver,
what they cost, and which to run.

A layout is (prefill EP, decode EP); at a request rate each role gets the fewest whole groups:

- decode: every rank holds `batch` requests (at most what its free HBM holds for their whole KV,
  at most the all-to-all's 256-token buffer, and few enough that a step stays under the ITL
  target); a group delivers `ep * batch / step` output tokens/s;
- prefill: a group computes `ep * chunk / step` new tokens/s (chunk: new tokens per rank per
  step, at most 16,384); a request waits for the step under way and for those queued before it
  (M/D/1: a step's time times 1.5 + rho / (2 (1 - rho)) at utilization rho), then its KV goes to
  decode and the first decode step runs: TTFT. The chunk and the utilization are the largest
  that keep TTFT under its target.

Throughput per node: what a node of the role delivers at that load. Cost per million output tokens:
the GPU-hours at the request rate (whole groups: a wide one is idle at low rates), or at full load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from orchestrator.planner.cost import FITTED, GB, Efficiency, Group, Precision
from orchestrator.planner.specs import GpuSpec, ModelSpec

PREFILL_WIDTHS = (8, 16, 32, 64)
DECODE_WIDTHS = (8, 16, 32, 64, 72, 144, 256)
MAX_CHUNK = 16384
BATCH_CAP = 256
MARGIN = 0.10
"""Hysteresis: the layout in use (`keep`) stays recommended while it costs at most this much more
per output token than the cheapest (the model's fitted rows are within 15%; a switch redeploys).
DeepSeek's traffic on H800s, 65 -> 2,900 requests/s in 3% steps: the cheapest changes 78 times,
the kept recommendation 7."""


@dataclass(frozen=True)
class Traffic:
    """A traffic profile and its targets. Defaults: DeepSeek's published 24-hour service (608B input
    and 168B output tokens a day, 4,989 tokens of KV per output token: input 4,384 and output
    1,211 tokens, so input + output / 2 = 4,989), request lengths varying as an exponential
    distribution does (coefficient of variation 1)."""

    request_rate: float | None = None
    input_len: float = 4384
    output_len: float = 1211
    cache_hit: float = 0.0
    length_cv: float = 1.0
    ttft_ms: float = 5000
    itl_ms: float = 100
    balancedness: float = 0.85
    usd_per_gpu_hour: float = 2.0  # DeepSeek's assumption for an H800 (day-6 overview)
    precision: Precision = field(default_factory=Precision)  # of the KV cache and the experts


@dataclass
class Layout:
    prefill_ep: int
    decode_ep: int
    prefill_groups: int
    decode_groups: int
    gpus: int
    input_tokens_per_s_per_node: float
    output_tokens_per_s_per_node: float
    ttft_ms: float
    itl_ms: float
    usd_per_million_output_tokens: float
    decode_batch_per_gpu: int = 0
    """Requests one decode GPU runs at once at its operating point (HBM and the ITL target bound it)."""
    decode_step_ms: float = 0.0
    prefill_chunk_per_gpu: int = 0
    """New tokens one prefill GPU takes a step."""
    prefill_utilization: float = 0.0
    """The share of its capacity prefill runs at, so that queueing stays within the TTFT target."""
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("notes")
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


class Infeasible(ValueError):
    """A layout that cannot meet the targets (or hold the model) at all; the message says why, and
    `code` (does_not_fit, no_kv_room, itl_unreachable, ttft_unreachable, nothing_serves), `role`
    and `ep` say it to a program."""

    def __init__(
        self, message: str, code: str = "nothing_serves", role: str | None = None, ep: int | None = None
    ):
        super().__init__(message)
        self.code, self.role, self.ep = code, role, ep

    def as_json(self) -> dict[str, Any]:
        return {"code": self.code, "role": self.role, "ep": self.ep, "message": str(self)}


def evaluate(model: ModelSpec, gpu: GpuSpec, traffic: Traffic, prefill_ep: int, decode_ep: int,
             eff: Efficiency = FITTED) -> Layout:  # fmt: skip
    """One layout at `traffic`; raises Infeasible when it cannot serve it."""
    t = traffic
    pre = Group(model, gpu, prefill_ep, balancedness=t.balancedness, eff=eff, precision=t.precision)
    dec = Group(model, gpu, decode_ep, balancedness=t.balancedness, eff=eff, precision=t.precision)
    for role, g in (("prefill", pre), ("decode", dec)):
        if not g.fits():
            message = (f"{model.name} does not fit on {gpu.name} at {role} EP{g.ep}: "
                       f"{g.weight_bytes() / GB:.0f} GB of weights per GPU")  # fmt: skip
            raise Infeasible(message, "does_not_fit", role, g.ep)
    context_decode = t.input_len + t.output_len / 2  # KV per output token (what DeepSeek reports)
    batch, step = decode_batch(dec, t, context_decode)
    decode_capacity = decode_ep * batch / step  # output tokens/s per group
    new = t.input_len * (1 - t.cache_hit)
    # a new token attends its request's cached prefix and half its new part; over requests of
    # varying length that weighs long ones more: E[len^2] / E[len] = mean (1 + cv^2)
    context_prefill = (t.input_len * t.cache_hit + new / 2) * (1 + t.length_cv**2)
    handoff = step + new * dec.kv_bytes_per_token / (gpu.nic_gb_s * GB)  # KV transfer + first step
    chunk, rho, prefill_step = _prefill_operating_point(pre, context_prefill, t.ttft_ms / 1e3 - handoff)
    prefill_capacity = prefill_ep * chunk / prefill_step * rho  # new tokens/s per group, within TTFT
    notes = [f"decode: {batch} requests per GPU, {step * 1e3:.0f} ms a step",
             f"prefill: {chunk} tokens per GPU a step, run at {rho:.0%} of capacity"]  # fmt: skip
    full_rate = min(prefill_capacity / new, decode_capacity / t.output_len)
    rate = t.request_rate if t.request_rate is not None else full_rate
    prefill_groups = max(1, math.ceil(rate * new / prefill_capacity - 1e-9))
    decode_groups = max(1, math.ceil(rate * t.output_len / decode_capacity - 1e-9))
    if t.request_rate is None:  # a layout "at full load": one group of the scarcer role
        prefill_groups, decode_groups = _ratio(prefill_capacity / new, decode_capacity / t.output_len)
        rate = min(prefill_groups * prefill_capacity / new, decode_groups * decode_capacity / t.output_len)
    gpus = prefill_ep * prefill_groups + decode_ep * decode_groups
    # latency at this rate: decode batches hold the requests in flight; prefill queues as it does
    in_flight = rate * t.output_len / (decode_groups * decode_ep) * step
    itl = dec.decode_step_seconds(max(1.0, min(batch, in_flight)), context_decode)
    load = rate * new / (prefill_groups * prefill_capacity / rho)
    ttft = prefill_step * (1.5 + load / (2 * max(1e-9, 1 - load))) + handoff
    usd = gpus * t.usd_per_gpu_hour / 3600 / max(rate * t.output_len, 1e-12) * 1e6
    per_node = gpu.gpus_per_node
    return Layout(
        prefill_ep, decode_ep, prefill_groups, decode_groups, gpus,
        input_tokens_per_s_per_node=prefill_capacity / (1 - t.cache_hit) / prefill_ep * per_node,
        output_tokens_per_s_per_node=decode_capacity / decode_ep * per_node,
        ttft_ms=ttft * 1e3, itl_ms=itl * 1e3, usd_per_million_output_tokens=usd,
        decode_batch_per_gpu=batch, decode_step_ms=step * 1e3, prefill_chunk_per_gpu=chunk,
        prefill_utilization=rho, notes=notes,
    )  # fmt: skip


def decode_batch(group: Group, t: Traffic, context: float) -> tuple[int, float]:
    """(requests per rank, step seconds): the most that fit in HBM and the ITL target."""
    limit = group.decode_batch_limit(t.input_len + t.output_len, BATCH_CAP)
    if limit < 1:
        raise Infeasible(
            f"decode EP{group.ep}: no room for one request's KV beside the weights",
            "no_kv_room",
            "decode",
            group.ep,
        )
    lo, hi = 1, limit
    if group.decode_step_seconds(1, context) * 1e3 > t.itl_ms:
        step = group.decode_step_seconds(1, context) * 1e3
        raise Infeasible(
            f"decode EP{group.ep}: one request alone takes {step:.0f} ms a step (ITL {t.itl_ms:.0f})",
            "itl_unreachable", "decode", group.ep,
        )  # fmt: skip
    while lo < hi:  # the largest batch within the ITL target (step time grows with the batch)
        mid = (lo + hi + 1) // 2
        if group.decode_step_seconds(mid, context) * 1e3 <= t.itl_ms:
            lo = mid
        else:
            hi = mid - 1
    return lo, group.decode_step_seconds(lo, context)


def _prefill_operating_point(group: Group, context: float, budget_s: float) -> tuple[int, float, float]:
    """(chunk, utilization, step seconds) that delivers the most new tokens/s while a request's
    wait plus its step stays within `budget_s`."""
    best = None
    chunk = MAX_CHUNK
    while chunk >= 256:
        step = group.prefill_step_seconds(chunk, context)
        room = budget_s / step - 1.5  # rho / (2 (1 - rho)) may be at most this
        if room > 0:
            rho = min(0.95, 2 * room / (1 + 2 * room))
            if best is None or chunk / step * rho > best[0]:
                best = (chunk / step * rho, chunk, rho, step)
        chunk //= 2
    if best is None:
        message = f"prefill EP{group.ep}: even a 256-token step misses the TTFT target"
        raise Infeasible(message, "ttft_unreachable", "prefill", group.ep)
    return best[1], best[2], best[3]


def _ratio(prefill_rate: float, decode_rate: float) -> tuple[int, int]:
    """Groups per role at full load: one group of the role whose group carries more requests/s,
    and as many of the other as match it."""
    if prefill_rate >= decode_rate:
        return 1, max(1, round(prefill_rate / decode_rate))
    return max(1, round(decode_rate / prefill_rate)), 1


def plan(model: ModelSpec, gpu: GpuSpec, traffic: Traffic, prefill_eps: Sequence[int] = PREFILL_WIDTHS,
         decode_eps: Sequence[int] = DECODE_WIDTHS, eff: Efficiency = FITTED,
         keep: tuple[int, int] | None = None, margin: float = MARGIN) -> dict[str, Any]:  # fmt: skip
    """{"layouts", "recommendation", "why", "reason", "crossover_request_rate", "skipped"}: every
    feasible layout of the given widths at `traffic`, the cheapest per output token that meets
    the targets (`why` in words, `reason` for programs), the request rate above which a wider
    layout becomes the cheapest, and the widths left out (Infeasible, each with its code)."""
    layouts, skipped = _feasible(model, gpu, traffic, prefill_eps, decode_eps, eff)
    if not layouts:
        raise Infeasible("no layout can serve this: " + "; ".join(map(str, skipped)))
    best = _cheapest(layouts)
    kept = _kept(layouts, keep, best, margin)
    ranked = sorted(layouts, key=lambda x: x.usd_per_million_output_tokens)
    why = (f"cheapest per output token among {len(layouts)} layouts meeting TTFT <= {traffic.ttft_ms:.0f} ms "
           f"and ITL <= {traffic.itl_ms:.0f} ms")  # fmt: skip
    reason: dict[str, Any] = {"rule": "cheapest_per_output_token", "layouts_compared": len(layouts),
                              "ttft_ms_target": traffic.ttft_ms, "itl_ms_target": traffic.itl_ms,
                              "runner_up": None, "margin": margin, "kept": kept is not None}  # fmt: skip
    if len(ranked) > 1:
        runner = ranked[1]
        extra = runner.usd_per_million_output_tokens / best.usd_per_million_output_tokens - 1
        why += f"; next: prefill EP{runner.prefill_ep} / decode EP{runner.decode_ep}, {extra:+.0%} per token"
        reason["runner_up"] = {"prefill_ep": runner.prefill_ep, "decode_ep": runner.decode_ep,
                               "extra_cost": round(extra, 4)}  # fmt: skip
    if kept is not None and kept is not best:
        extra = kept.usd_per_million_output_tokens / best.usd_per_million_output_tokens - 1
        why = (f"the layout in use, {extra:+.1%} per token against the cheapest (prefill "
               f"EP{best.prefill_ep} / decode EP{best.decode_ep}): within the {margin:.0%} margin, "
               "not worth a redeployment")  # fmt: skip
        reason["rule"], best = "kept_within_margin", kept
    crossover = None
    if len(prefill_eps) * len(decode_eps) > 1:
        crossover = crossover_rate(model, gpu, traffic, prefill_eps, decode_eps, eff, margin)
    return {"layouts": layouts, "recommendation": best, "why": why, "reason": reason,
            "crossover_request_rate": crossover, "skipped": skipped}  # fmt: skip


def _feasible(model: ModelSpec, gpu: GpuSpec, traffic: Traffic, prefill_eps: Sequence[int],
              decode_eps: Sequence[int],
              eff: Efficiency) -> tuple[list[Layout], list[Infeasible]]:  # fmt: skip
    layouts: list[Layout] = []
    skipped: list[Infeasible] = []
    for p in prefill_eps:
        for d in decode_eps:
            try:
                layouts.append(evaluate(model, gpu, traffic, p, d, eff))
            except Infeasible as e:
                if str(e) not in map(str, skipped):
                    skipped.append(e)
    return layouts, skipped


def _cheapest(layouts: list[Layout]) -> Layout:
    return min(layouts, key=lambda x: (x.usd_per_million_output_tokens, x.gpus, x.decode_ep, x.prefill_ep))


def _kept(layouts: list[Layout], keep: tuple[int, int] | None, best: Layout, margin: float) -> Layout | None:
    """The layout in use (prefill EP, decode EP), if it still serves within `margin` of the cheapest."""
    for x in layouts:
        if keep == (x.prefill_ep, x.decode_ep):
            within = x.usd_per_million_output_tokens <= best.usd_per_million_output_tokens * (1 + margin)
            return x if within else None
    return None


def crossover_rate(model: ModelSpec, gpu: GpuSpec, traffic: Traffic, prefill_eps: Sequence[int],
                   decode_eps: Sequence[int], eff: Efficiency = FITTED,
                   margin: float = MARGIN) -> float | None:  # fmt: skip
    """The request rate of the regime change: above it the recommendation is wider (in GPUs per
    decode or prefill group) than at a trickle of traffic, for good. The rates 10^-2 .. 10^5/s are
    walked upwards with hysteresis (`margin`: a layout in use stays while it costs within the
    margin of the cheapest), so a whole-group rounding flip and back is no crossover; None if the
    recommendation ends narrow."""

    def recommend(rate: float, keep: tuple[int, int] | None) -> Layout | None:
        layouts = _feasible(model, gpu, replace_rate(traffic, rate), prefill_eps, decode_eps, eff)[0]
        if not layouts:
            return None
        best = _cheapest(layouts)
        return _kept(layouts, keep, best, margin) or best

    rates = [10 ** (k / 8) for k in range(-16, 41)]  # 0.01 .. 100,000 requests/s
    first = recommend(rates[0], None)
    if first is None:
        return None
    narrow = (first.decode_ep, first.prefill_ep)
    keep, start = (first.prefill_ep, first.decode_ep), None
    for rate in rates[1:]:
        rec = recommend(rate, keep)
        if rec is None:
            continue
        keep = (rec.prefill_ep, rec.decode_ep)
        wide = rec.decode_ep > narrow[0] or rec.prefill_ep > narrow[1]
        start = (start or rate) if wide else None  # the start of the last wide run
    return start


def replace_rate(traffic: Traffic, rate: float | None) -> Traffic:
    return replace(traffic, request_rate=rate)
