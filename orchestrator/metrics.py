"""Prometheus metrics of the orchestrator (`GET /metrics`), all named `moeserve_*`.

Per request: time to first token, inter-token latency, end-to-end latency (histograms by model)
and the outcome (counter); retries before the first token and migrations after it; where
decode-first first tokens came from; per instance
at scrape time: state,
breaker state, running and waiting requests, KV tokens in use and in total.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.errors import ApiError
from orchestrator.events import TokenEvent
from orchestrator.fleet.autoscaler import SIGNALS
from orchestrator.fleet.breaker import BreakerState
from orchestrator.fleet.registry import Registry, State
from services.common.logs import requests

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

REGISTRY = CollectorRegistry()
TTFT = Histogram(
    "moeserve_time_to_first_token_seconds", "From request arrival to its first token.", ["model"],
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
ITL = Histogram(
    "moeserve_inter_token_latency_seconds", "Between consecutive tokens of a request.", ["model"],
    buckets=ITL_BUCKETS, registry=REGISTRY,
)  # fmt: skip
QUEUE_TIME = Histogram(
    "moeserve_queue_time_seconds", "Time a request waited for a place in flight.", ["model"],
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
E2E = Histogram(
    "moeserve_e2e_request_latency_seconds", "From request arrival to its last token.", ["model"],
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
REQUESTS = Counter(
    "moeserve_requests",
    "Requests by outcome: ok, cancelled (the client left), rejected (a 4xx: the request's own fault), "
    "throttled (429), error (this service's failure: 5xx, or a stream cut by an instance).",
    ["model", "outcome"], registry=REGISTRY,
)  # fmt: skip
RETRIES = Counter(
    "moeserve_retries", "Requests retried on a fresh pair before their first token.", registry=REGISTRY
)
MIGRATIONS = Counter(
    "moeserve_migrations",
    "Requests moved to a fresh pair after an instance failed mid-stream.",
    registry=REGISTRY,
)
FIRST_TOKENS = Counter(
    "moeserve_first_tokens",
    "Decode-first attempts that named this router's first-token feed, by what brought their first "
    "token sooner: prefill (its FirstTokens stream, ahead of the KV transfer) or decode.",
    ["source"],
    registry=REGISTRY,
)


async def timed(
    events: AsyncIterator[TokenEvent], model: str, start: float, request_id: str
) -> AsyncGenerator[TokenEvent, None]:
    """`events` unchanged; records TTFT, ITL (per token), end-to-end latency and the outcome, and
    logs the finished request (`--log-requests`)."""
    last: float | None = None
    first: float | None = None
    outcome = "error"
    event = None
    ttft, itl, e2e = _series(model)
    SIGNALS.arrival()
    try:
        async for event in events:
            now = time.monotonic()
            if event.token_ids:
                if last is None:
                    first = now - start
                    ttft.observe(first)
                    SIGNALS.first_token(first)
                else:
                    gap = (now - last) / len(event.token_ids)  # tokens that arrive together share it
                    for _ in event.token_ids:
                        itl.observe(gap)
                    SIGNALS.inter_token(gap)
                last = now
            if event.finish_reason is not None:
                outcome = "ok"
                e2e.observe(now - start)
            yield event
    except (GeneratorExit, asyncio.CancelledError):  # closed or cancelled: the client left (or done)
        outcome = "ok" if outcome == "ok" else "cancelled"
        raise
    except ApiError as e:
        outcome = outcome_of(e.status)
        raise
    finally:
        REQUESTS.labels(model, outcome).inc()
        _log_finished(request_id, outcome, event, first, time.monotonic() - start)


def outcome_of(status: int) -> str:
    """The outcome of a request answered with an error `status`."""
    return "throttled" if status == 429 else "rejected" if 400 <= status < 500 else "error"


@functools.cache
def _series(model: str) -> tuple[Histogram, Histogram, Histogram]:
    """A model's TTFT, ITL and end-to-end series (looked up once, not per token)."""
    return TTFT.labels(model), ITL.labels(model), E2E.labels(model)


def _log_finished(
    request_id: str, outcome: str, last: TokenEvent | None, first: float | None, seconds: float
) -> None:
    fields = {
        "outcome": outcome,
        "prompt_tokens": last.prompt_tokens if last else 0,
        "completion_tokens": last.completion_tokens if last else 0,
        "ttft_s": None if first is None else round(first, 6),
        "e2e_s": round(seconds, 6),
    }
    requests.info(
        "request %s %s: %d prompt + %d completion tokens, first token after %s, %.3f s in all",
        request_id, outcome, fields["prompt_tokens"], fields["completion_tokens"],
        "-" if first is None else f"{first:.3f} s", seconds,
        extra={"request_id": request_id, "fields": fields},
    )  # fmt: skip


class InstanceCollector(Collector):
    """The registry's instances as gauges, read at scrape time."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def collect(self) -> Iterable[GaugeMetricFamily]:
        labels = ["instance", "role"]
        state = GaugeMetricFamily(
            "moeserve_instance_state", "1 for the instance's current state.", labels=[*labels, "state"]
        )
        breaker = GaugeMetricFamily(
            "moeserve_instance_breaker",
            "1 for the instance's circuit-breaker state.",
            labels=[*labels, "state"],
        )
        running = GaugeMetricFamily("moeserve_instance_running_requests", "Requests running.", labels=labels)
        waiting = GaugeMetricFamily("moeserve_instance_waiting_requests", "Requests waiting.", labels=labels)
        kv_used = GaugeMetricFamily("moeserve_instance_kv_used_tokens", "KV tokens in use.", labels=labels)
        kv_total = GaugeMetricFamily("moeserve_instance_kv_total_tokens", "KV tokens in all.", labels=labels)
        handoff = GaugeMetricFamily(
            "moeserve_instance_kv_transfer_latency_seconds",
            "Prefill: mean time of a request's KV hand-off writes, over its ranks.",
            labels=labels,
        )
        speed = GaugeMetricFamily(
            "moeserve_instance_kv_transfer_bytes_per_second", "Prefill: KV write speed.", labels=labels
        )
        balance = GaugeMetricFamily(
            "moeserve_instance_expert_balancedness",
            "Mean / max tokens per EP rank over the recent window (1 = even; EP instances only).",
            labels=labels,
        )
        for inst in self.registry.all:
            ids = [inst.id, inst.role]
            for s in State:
                state.add_metric([*ids, s.value], 1.0 if inst.state == s else 0.0)
            for b in BreakerState:
                breaker.add_metric([*ids, b.value], 1.0 if inst.breaker.state == b else 0.0)
            running.add_metric(ids, sum(ld.running for ld in inst.loads))
            waiting.add_metric(ids, sum(ld.waiting for ld in inst.loads))
            kv_used.add_metric(ids, sum(ld.kv_used_tokens for ld in inst.loads))
            kv_total.add_metric(ids, sum(ld.kv_total_tokens for ld in inst.loads))
            if inst.role == "prefill" and inst.loads:
                latency_ms = sum(ld.kv_transfer_latency_ms for ld in inst.loads) / len(inst.loads)
                handoff.add_metric(ids, latency_ms / 1e3)
                speed.add_metric(ids, sum(ld.kv_transfer_gb_s for ld in inst.loads) * 1e9)
            if inst.balancedness is not None:
                balance.add_metric(ids, inst.balancedness)
        yield from (state, breaker, running, waiting, kv_used, kv_total, handoff, speed, balance)


def exposition(registry: Registry) -> bytes:
    """The text exposition: the request metrics and this registry's instances."""
    instances = CollectorRegistry()
    instances.register(InstanceCollector(registry))
    return generate_latest(REGISTRY) + generate_latest(instances)
