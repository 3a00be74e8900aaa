"""Layouts for a traffic profile: how many groups of which EP width per role, what they deliver,
what they cost, and which to run.

A layout is (prefill EP, decode EP); at a request rate each role gets the fewest whole groups:

- decode: every rank holds `batch` requests (at most what its free HBM holds for their whole KV,
  at most `Techniques.max_decode_batch`, and few enough that a token stays under the ITL target);
  a group delivers `ep * batch * tokens_per_step / step` output tokens/s (MTP: more than one);
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
from dataclasses import replace
from typing import Any

from orchestrator.planner.cost import FITTED, GB, Efficiency
from orchestrator.planner.group import Group
from orchestrator.planner.layout import Infeasible, Layout, Traffic
from orchestrator.planner.specs import GpuSpec, ModelSpec

PREFILL_WIDTHS = (8, 16, 32, 64)
DECODE_WIDTHS = (8, 16, 32, 64, 72, 144, 256)
MAX_CHUNK = 16384
MARGIN = 0.10
"""Hysteresis: the layout in use (`keep`) stays recommended while it costs at most this much more
per output token than the cheapest (the model's fitted rows are within 15%; a switch redeploys).
docs/planner.md ("Stable recommendations") gives how often each changes, generated."""


def groups(model: ModelSpec, gpu: GpuSpec, traffic: Traffic, prefill_ep: int, decode_ep: int,
           eff: Efficiency = FITTED) -> tuple[Group, Group]:  # fmt: skip
    """The layout's prefill and decode groups; raises Infeasible when either cannot hold the model
    or a tensor-parallel prefill group would leave its NVLink domain."""
    t, parallel = traffic, traffic.techniques.prefill_parallel
    common = dict(balancedness=t.balancedness, eff=eff, precision=t.precision, techniques=t.techniques)
    pre = Group(model, gpu, prefill_ep, parallel=parallel, **common)  # type: ignore[arg-type]
    # offload is prefill's: a decode step is too short to stream weights in
    common["techniques"] = replace(t.techniques, offload_gb=0.0)
    dec = Group(model, gpu, decode_ep, **common)  # type: ignore[arg-type]
    if parallel != "ep" and prefill_ep > gpu.domain:
        message = (f"prefill {parallel.upper()}{prefill_ep} spans more than one NVLink domain "
                   f"({gpu.domain} GPUs): its collectives run over NVLink")  # fmt: skip
        raise Infeasible(message, "beyond_nvlink_domain", "prefill", prefill_ep)
    for role, g in (("prefill", pre), ("decode", dec)):
        if not g.fits():
            message = (f"{model.name} does not fit on {gpu.name} at {role} {g.parallel.upper()}{g.ep}: "
                       f"{g.weight_bytes() / GB:.0f} GB of weights per GPU")  # fmt: skip
            raise Infeasible(message, "does_not_fit", role, g.ep)
    return pre, dec


def prefill_context(t: Traffic) -> float:
    """The context a new prompt token attends on average: its request's cached prefix and half its
    new part; over requests of varying length that weighs long ones more: E[len^2] / E[len] =
    mean (1 + cv^2)."""
    return (t.input_len * t.cache_hit + t.input_len * (1 - t.cache_hit) / 2) * (1 + t.length_cv**2)


def decode_context(t: Traffic) -> float:
    """KV a decode step reads per request: input + output / 2 (DeepSeek's "average KV length per
    output token")."""
    return t.input_len + t.output_len / 2


def evaluate(model: ModelSpec, gpu: GpuSpec, traffic: Traffic, prefill_ep: int, decode_ep: int,
             eff: Efficiency = FITTED) -> Layout:  # fmt: skip
    """One layout at `traffic`; raises Infeasible when it cannot serve it."""
    t = traffic
    pre, dec = groups(model, gpu, t, prefill_ep, decode_ep, eff)
    tokens = t.techniques.tokens_per_step
    batch, step = decode_batch(dec, t, decode_context(t))
    decode_capacity = decode_ep * batch * tokens / step  # output tokens/s per group
    new = t.input_len * (1 - t.cache_hit)
    handoff = step + new * dec.kv_bytes_per_token / (gpu.nic_gb_s * GB)  # KV transfer + first step
    chunk, rho, prefill_step = _prefill_operating_point(pre, prefill_context(t), t.ttft_ms / 1e3 - handoff)
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
    in_flight = rate * t.output_len / (decode_groups * decode_ep * tokens) * step
    itl = dec.decode_step_seconds(max(1.0, min(batch, in_flight)), decode_context(t)) / tokens
    load = rate * new / (prefill_groups * prefill_capacity / rho)
    ttft = prefill_step * (1.5 + load / (2 * max(1e-9, 1 - load))) + handoff
    usd = gpus * t.usd_per_gpu_hour / 3600 / max(rate * t.output_len, 1e-12) * 1e6
    input_per_gpu = prefill_capacity / (1 - t.cache_hit) / prefill_ep  # cache hits included
    output_per_gpu = decode_capacity / decode_ep
    per_node = gpu.gpus_per_node
    return Layout(
        prefill_ep, decode_ep, prefill_groups, decode_groups, gpus,
        input_tokens_per_s_per_node=input_per_gpu * per_node,
        output_tokens_per_s_per_node=output_per_gpu * per_node,
        ttft_ms=ttft * 1e3, itl_ms=itl * 1e3, usd_per_million_output_tokens=usd,
        decode_batch_per_gpu=batch, decode_step_ms=step * 1e3, prefill_chunk_per_gpu=chunk,
        prefill_utilization=rho, input_tokens_per_s_per_gpu=input_per_gpu,
        output_tokens_per_s_per_gpu=output_per_gpu, notes=notes,
    )  # fmt: skip


def decode_batch(group: Group, t: Traffic, context: float) -> tuple[int, float]:
    """(requests per rank, step seconds): the most that fit in HBM and the ITL target (a step
    emits `tokens_per_step` tokens a request, so the ITL is the step over that)."""
    limit = group.decode_batch_limit(t.input_len + t.output_len)
    if limit < 1:
        raise Infeasible(
            f"decode EP{group.ep}: no room for one request's KV beside the weights",
            "no_kv_room",
            "decode",
            group.ep,
        )
    tokens = t.techniques.tokens_per_step

    def itl_ms(batch: int) -> float:
        return group.decode_step_seconds(batch, context) * 1e3 / tokens

    if itl_ms(1) > t.itl_ms:
        raise Infeasible(
            f"decode EP{group.ep}: one request alone takes {itl_ms(1):.0f} ms a token (ITL {t.itl_ms:.0f})",
            "itl_unreachable", "decode", group.ep,
        )  # fmt: skip
    lo, hi = 1, limit
    while lo < hi:  # the largest batch within the ITL target (step time grows with the batch)
        mid = (lo + hi + 1) // 2
        if itl_ms(mid) <= t.itl_ms:
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
