"""What an engine's steps cost: step time and batch size per phase, tokens computed.

Plain counters and fixed-bucket histograms, cumulative like Prometheus's, updated on the engine
thread (a few additions per step) and copied out for the worker's `/metrics`.
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass, field

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
PHASES = ("prefill", "decode")


@dataclass
class Histogram:
    """Observations counted per upper bound (`le`), with their sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    """Per bound, observations <= it and above the bound before (not cumulative)."""
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, observations <= le) for every bound and +Inf, as Prometheus exposes them."""
        out, running = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass
class StepStats:
    """Per phase: step seconds, requests per step, tokens computed."""

    seconds: dict[str, Histogram] = field(default_factory=lambda: _per_phase(STEP_BUCKETS))
    batch: dict[str, Histogram] = field(default_factory=lambda: _per_phase(BATCH_BUCKETS))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))

    def record(self, phase: str, seconds: float, requests: int, tokens: int) -> None:
        self.seconds[phase].observe(seconds)
        self.batch[phase].observe(requests)
        self.tokens[phase] += tokens

    def snapshot(self) -> StepStats:
        return copy.deepcopy(self)


def _per_phase(bounds: tuple[float, ...]) -> dict[str, Histogram]:
    return {phase: Histogram(bounds) for phase in PHASES}
