"""The autoscaler (off by default; `moeserve serve --autoscale on|KEY=VALUE,...`): sets each pool's
desired instance count through the pools API from live signals, one whole group at a time.

Every `interval` seconds, per role:
- demand: requests in flight on the role's instances (running + waiting, as they report them, or
  what this orchestrator has sent them if more), projected over the cold start when arrivals are
  rising (the newer half of the window's arrival rate over the older half, at most 2x);
- capacity of a group: the requests one instance holds at once, as the instances report it
  (`max_running_requests` x DP ranks) or, for decode with `model=`, `gpu=` and `decode-ep=`, as
  the cost model plans it (requests per GPU within the ITL target x EP width);
- need = demand / (capacity x `utilization`), rounded up; one more when the role is under
  pressure: requests waiting for a place, TTFT p90 (prefill) or ITL p90 (decode) over the window
  above its target, or decode KV usage above 90%.

Scaling up happens at once, but not again while a group it started is still coming up (its cold
start: `cold-start` seconds at most). Scaling down is one group at a time and only after the
remaining groups would have run below `down-utilization` for `down-delay` seconds without
pressure (hysteresis: a load between the two thresholds changes nothing). Each decision is logged
with its reasons, and `GET /admin/autoscaler` shows the signals, the last evaluation per role and
the recent decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from orchestrator.fleet.membership import Membership, ScaleError
from orchestrator.fleet.registry import Instance, Registry, State
from services.common.roles import ROLES, Role

if TYPE_CHECKING:
    from orchestrator.planner.cost import Precision, Techniques

log = logging.getLogger("orchestrator.fleet.autoscaler")


@dataclass(frozen=True)
class AutoscalerConfig:
    interval: float = 5.0
    window: float = 30.0
    min: int = 1
    max: int = 8
    utilization: float = 0.7
    down_utilization: float = 0.4
    down_delay: float = 60.0
    cold_start: float = 600.0
    ttft_ms: float = 5000.0
    itl_ms: float = 100.0
    model: str = ""
    gpu: str = ""
    """A built-in GPU or a spec file (`moeserve plan --gpu`)."""
    decode_ep: int = 0
    kv_cache: str = "bf16"
    experts: str = "fp8"
    attention: str = "bf16"
    mtp_draft: int = 0
    mtp_acceptance: float = 0.0
    max_decode_batch: int = 256
    """Precisions and techniques of the decode instances, as `moeserve plan` takes them."""

    @classmethod
    def parse(cls, spec: str) -> AutoscalerConfig:
        """`on` (the defaults) or `KEY=VALUE,...` with the field names (dashes for underscores)."""
        if spec.strip() in ("on", ""):
            return cls()
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for item in spec.split(","):
            key, sep, value = item.strip().partition("=")
            key = key.replace("-", "_")
            if not sep or key not in known:
                raise ValueError(f"--autoscale takes 'on' or KEY=VALUE,... with keys {', '.join(known)}; "
                                 f"not {item.strip()!r}")  # fmt: skip
            try:
                values[key] = value if known[key] == "str" else type(getattr(cls, key))(value)
            except ValueError:
                raise ValueError(f"--autoscale {key}={value!r} is not a number") from None
        config = cls(**values)
        if not 0 <= config.min <= config.max or not 0 < config.down_utilization < config.utilization <= 1:
            raise ValueError("--autoscale needs 0 <= min <= max and 0 < down-utilization < utilization <= 1")
        try:
            config.precision_and_techniques()
        except ValueError as e:
            raise ValueError(f"--autoscale: {e}") from None
        return config

    def precision_and_techniques(self) -> tuple[Precision, Techniques]:
        from orchestrator.planner.cost import Precision, Techniques

        techniques = Techniques(mtp_draft=self.mtp_draft, mtp_acceptance=self.mtp_acceptance,
                                max_decode_batch=self.max_decode_batch)  # fmt: skip
        return Precision(self.kv_cache, self.experts, self.attention), techniques


class Signals:
    """Recent arrivals and latencies, kept for the autoscaler's window (the API records them)."""

    def __init__(self, keep_s: float = 600.0):
        self.keep_s = keep_s
        self.arrivals: deque[float] = deque()
        self.ttft: deque[tuple[float, float]] = deque()
        self.itl: deque[tuple[float, float]] = deque()

    def arrival(self) -> None:
        self._add(self.arrivals, time.monotonic())

    def first_token(self, seconds: float) -> None:
        self._add(self.ttft, (time.monotonic(), seconds))

    def inter_token(self, seconds: float) -> None:
        self._add(self.itl, (time.monotonic(), seconds))

    def _add(self, series: deque[Any], item: float | tuple[float, float]) -> None:
        series.append(item)
        horizon = time.monotonic() - self.keep_s
        while series and (series[0] if isinstance(series[0], float) else series[0][0]) < horizon:
            series.popleft()

    def rates(self, window: float) -> tuple[float, float]:
        """(arrivals/s over the window, newer half's rate over the older half's; 1 if unknown)."""
        now = time.monotonic()
        recent = [t for t in self.arrivals if t >= now - window]
        newer = sum(1 for t in recent if t >= now - window / 2)
        older = len(recent) - newer
        trend = newer / older if older else (2.0 if newer else 1.0)
        return len(recent) / window, trend

    def p90(self, series: deque[tuple[float, float]], window: float) -> float | None:
        now = time.monotonic()
        values = sorted(v for t, v in series if t >= now - window)
        return values[int(0.9 * (len(values) - 1))] if values else None


SIGNALS = Signals()


class Autoscaler:
    def __init__(self, config: AutoscalerConfig, registry: Registry, membership: Membership,
                 signals: Signals = SIGNALS):  # fmt: skip
        self.config, self.registry, self.membership, self.signals = config, registry, membership, signals
        self.decisions: deque[dict[str, Any]] = deque(maxlen=50)
        self.evaluations: dict[Role, dict[str, Any]] = {}
        self._calm_since: dict[Role, float | None] = {role: None for role in ROLES}
        self._raised_at: dict[Role, float] = {}
        self._planned = _planned_capacity(config)
        self._task: asyncio.Task[None] | None = None
        self._scaling: dict[Role, asyncio.Task[None]] = {}
        """A scale the backend is still carrying out (a scale-down drains first), per role."""

    async def start(self) -> None:
        membership = self.membership
        membership.check_scale("decode", max(1, self.config.min))  # fails now if the backend cannot scale
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        for task in [self._task, *self._scaling.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ScaleError):
                    await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval)
            for role in ROLES:
                try:
                    await self.evaluate(role)
                except ScaleError as e:
                    log.warning("autoscaler: cannot scale %s: %s", role, e)

    async def evaluate(self, role: Role, now: float | None = None) -> dict[str, Any]:
        """Look at `role` once and scale it if the signals say so; returns the evaluation."""
        cfg, now = self.config, time.monotonic() if now is None else now
        current = self.membership.desired()[role]
        live = [i for i in self.registry.of(role) if i.state not in (State.GONE, State.FAILED)]
        starting = [i for i in live if i.state == State.STARTING]
        in_flight = sum(max(i.inflight, sum(ld.running + ld.waiting for ld in i.loads)) for i in live)
        waiting = sum(ld.waiting for i in live for ld in i.loads)
        rate, trend = self.signals.rates(cfg.window)
        projected = in_flight * (min(trend, 2.0) if trend > 1 else 1.0)
        capacity = self._planned.get(role) or _reported_capacity(live) or 1
        need = math.ceil(projected / (capacity * cfg.utilization) - 1e-9) if projected else 0
        pressure = []
        if waiting:
            pressure.append(f"{waiting} requests waiting for a place")
        p90 = self.signals.p90(self.signals.ttft if role == "prefill" else self.signals.itl, cfg.window)
        target = cfg.ttft_ms if role == "prefill" else cfg.itl_ms
        if p90 is not None and p90 * 1e3 > target:
            pressure.append(
                f"{'TTFT' if role == 'prefill' else 'ITL'} p90 {p90 * 1e3:.0f} ms over {target:.0f}"
            )
        kv = [ld.kv_used_tokens / ld.kv_total_tokens for i in live for ld in i.loads if ld.kv_total_tokens]
        if role == "decode" and kv and max(kv) > 0.9:
            pressure.append(f"KV {max(kv):.0%} full")
        if pressure:
            need = max(need, current + 1)
        want = min(cfg.max, max(cfg.min, need))
        why = (f"{in_flight} requests in flight ({rate:.2f}/s arriving, trend x{trend:.2f}), "
               f"{capacity} per instance at {cfg.utilization:.0%} target utilization -> {need}")  # fmt: skip
        if pressure:
            why += "; " + ", ".join(pressure)
        to = current
        under_way = self._scaling.get(role)
        if under_way is not None and not under_way.done():
            why += "; the last scale is still under way"
        elif want > current:
            raised = self._raised_at.get(role)
            if starting and raised is not None and now - raised < cfg.cold_start:
                why += (
                    f"; {len(starting)} instance(s) still starting (cold start up to {cfg.cold_start:.0f} s)"
                )
            else:
                to = want
            self._calm_since[role] = None
        elif want < current:
            fits = in_flight <= capacity * (current - 1) * cfg.down_utilization and not pressure
            calm = self._calm_since[role]
            if not fits:
                self._calm_since[role] = None
                why += f"; keeping {current}: {current - 1} would run above {cfg.down_utilization:.0%}"
            elif calm is None:
                self._calm_since[role] = now
                why += f"; {current - 1} would do: waiting {cfg.down_delay:.0f} s before removing one"
            elif now - calm >= cfg.down_delay:
                to = current - 1
                self._calm_since[role] = None
            else:
                why += f"; {current - 1} would do for {now - calm:.0f} of {cfg.down_delay:.0f} s"
        else:
            self._calm_since[role] = None
        evaluation = {"role": role, "current": current, "desired": to, "reason": why, "in_flight": in_flight,
                      "capacity_per_instance": capacity, "arrival_rate": round(rate, 3)}  # fmt: skip
        self.evaluations[role] = evaluation
        if to != current:
            await self._scale(role, current, to, why, now)
        return evaluation

    async def _scale(self, role: Role, current: int, to: int, why: str, now: float) -> None:
        self.membership.check_scale(role, to)
        if to > current:
            self._raised_at[role] = now
        decision = {"at": time.time(), "role": role, "from": current, "to": to, "reason": why}
        self.decisions.append(decision)
        log.info("autoscaler: %s %d -> %d: %s", role, current, to, why)
        task = asyncio.create_task(self.membership.scale(role, to))  # a drain may take a while
        task.add_done_callback(_report_failure)
        self._scaling[role] = task

    def describe(self) -> dict[str, Any]:
        rate, trend = self.signals.rates(self.config.window)
        ttft, itl = (self.signals.p90(s, self.config.window) for s in (self.signals.ttft, self.signals.itl))
        return {
            "enabled": True,
            "config": asdict(self.config),
            "signals": {
                "arrival_rate": round(rate, 3),
                "arrival_trend": round(trend, 3),
                "ttft_p90_ms": None if ttft is None else round(ttft * 1e3, 1),
                "itl_p90_ms": None if itl is None else round(itl * 1e3, 1),
            },
            "capacity_from": "cost model" if self._planned else "instances' reports",
            "roles": self.evaluations,
            "decisions": list(self.decisions),
        }


def _report_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("autoscaler: the backend could not scale: %s", task.exception())


def _reported_capacity(instances: list[Instance]) -> int:
    known = [i.slots for i in instances if i.slots]
    return max(known) if known else 0


def _planned_capacity(config: AutoscalerConfig) -> dict[Role, int]:
    """Requests a decode group holds at once by the cost model (requests per GPU within the ITL
    target x EP width), when `model=`, `gpu=` and `decode-ep=` are set."""
    if not (config.model and config.gpu and config.decode_ep):
        return {}
    from orchestrator.planner.group import Group
    from orchestrator.planner.layout import Traffic
    from orchestrator.planner.plan import decode_batch
    from orchestrator.planner.specs import gpu_spec, model_spec

    precision, techniques = config.precision_and_techniques()
    traffic = Traffic(itl_ms=config.itl_ms, precision=precision, techniques=techniques)
    group = Group(model_spec(config.model), gpu_spec(config.gpu), config.decode_ep, precision=precision,
                  techniques=techniques)  # fmt: skip
    batch, _ = decode_batch(group, traffic, traffic.input_len + traffic.output_len / 2)
    return {"decode": batch * config.decode_ep}
