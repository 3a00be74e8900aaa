"""The worker's own Prometheus `/metrics` (`--metrics-port`), served by rank 0 apart from gRPC.

Read at scrape time from every DP rank of the instance (as GetLoads is), labelled `role` and
`dp_rank`: engine step time and requests per step (histograms by phase), tokens computed,
running and waiting requests, KV pages (used, total, stranded), the prefill's KV hand-off totals
(bytes, seconds, rooms, failed rooms), and the instance's expert-load balancedness (mean ÷ max
tokens per EP rank over the recent window, 1.0 = even) and gRPC calls by method.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.calls import CallError
from services.engine import Engine
from services.engine.stats import Histogram
from services.worker import messages as msg
from services.worker.config import WorkerConfig
from services.worker.front.dp_controller import DPController
from services.worker.front.info_rpcs import CallCounts
from services.worker.front.rebalancing import summed

SCRAPE_TIMEOUT_S = 5.0


class WorkerCollector(Collector):
    """The instance's ranks as metric families, asked at every scrape."""

    def __init__(self, config: WorkerConfig, engine: Engine, controller: DPController, calls: CallCounts):
        self.role, self.engine, self.ctl, self.calls = config.role, engine, controller, calls

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("moeserve_worker_up", "1 when every rank of the instance answered.")
        try:
            ranks: list[msg.RankMetrics] = self.ctl.ask_all("metrics", SCRAPE_TIMEOUT_S)
            expert = self.ctl.ask_all("expert_load", SCRAPE_TIMEOUT_S)
        except CallError:
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from self._steps(ranks)
        yield from self._loads(ranks)
        yield self._balancedness(expert)
        calls = CounterMetricFamily("moeserve_worker_grpc_calls", "gRPC calls by method.", labels=["method"])
        for method, n in sorted(dict(self.calls.counts).items()):
            calls.add_metric([method], n)
        yield calls

    def _steps(self, ranks: list[msg.RankMetrics]) -> Iterable[Metric]:
        labels = ["role", "dp_rank", "phase"]
        seconds = HistogramMetricFamily(
            "moeserve_worker_step_seconds", "Engine step time (one forward and sampling).", labels=labels
        )
        batch = HistogramMetricFamily(
            "moeserve_worker_batch_requests", "Requests in one engine step.", labels=labels
        )
        tokens = CounterMetricFamily("moeserve_worker_tokens", "Tokens computed.", labels=labels)
        for rank, m in enumerate(ranks):
            for phase, hist in m.steps.seconds.items():
                ids = [self.role, str(rank), phase]
                seconds.add_metric(ids, *_histogram(hist))
                batch.add_metric(ids, *_histogram(m.steps.batch[phase]))
                tokens.add_metric(ids, m.steps.tokens[phase])
        yield from (seconds, batch, tokens)

    def _loads(self, ranks: list[msg.RankMetrics]) -> Iterable[Metric]:
        labels = ["role", "dp_rank"]
        g = {
            name: GaugeMetricFamily(f"moeserve_worker_{name}", text, labels=labels)
            for name, text in (
                ("running_requests", "Requests in the running batch."),
                ("waiting_requests", "Requests queued or receiving their KV."),
                ("kv_used_tokens", "KV tokens in use (pages held, in tokens)."),
                ("kv_total_tokens", "KV tokens in the pool."),
                ("kv_stranded_pages", "Pages kept out of use: no prefill confirmed its writes stopped."),
                ("prefix_cached_pages", "Pages in the prefix cache (in use or evictable)."),
                ("prefix_evictable_pages", "Cached pages no request uses (available on demand)."),
            )
        }
        c = {
            name: CounterMetricFamily(f"moeserve_worker_kv_transfer_{name}", text, labels=labels)
            for name, text in (
                ("bytes", "KV bytes written to decode ranks (prefill)."),
                ("seconds", "Seconds spent writing KV to decode ranks (prefill)."),
                ("rooms", "Requests whose KV was handed off (prefill)."),
                ("failed_rooms", "Requests whose KV hand-off failed (prefill)."),
            )
        }
        prompt = CounterMetricFamily(
            "moeserve_worker_prompt_tokens", "Prompt tokens admitted.", labels=labels
        )
        hits = CounterMetricFamily(
            "moeserve_worker_prefix_cached_tokens", "Prompt tokens found in the prefix cache.", labels=labels
        )
        for rank, m in enumerate(ranks):
            ld, ids = m.load, [self.role, str(rank)]
            g["running_requests"].add_metric(ids, ld.running)
            g["waiting_requests"].add_metric(ids, ld.waiting)
            g["kv_used_tokens"].add_metric(ids, ld.used_tokens)
            g["kv_total_tokens"].add_metric(ids, ld.total_tokens)
            g["kv_stranded_pages"].add_metric(ids, ld.queues.get("stranded_pages", 0))
            g["prefix_cached_pages"].add_metric(ids, ld.cached_pages)
            g["prefix_evictable_pages"].add_metric(ids, ld.evictable_pages)
            prompt.add_metric(ids, ld.prompt_tokens)
            hits.add_metric(ids, ld.cached_tokens)
            for name, counter in c.items():
                counter.add_metric(ids, getattr(ld.transfer, name))
        yield from g.values()
        yield from c.values()
        yield from (prompt, hits)

    def _balancedness(self, loads: list[msg.ExpertLoad]) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(
            "moeserve_worker_expert_balancedness",
            "Mean / max tokens per EP rank over the recent window, averaged over MoE layers (1 = even).",
            labels=["role"],
        )
        value = self.engine.model.parallel.placement.balancedness(summed(loads))
        if value is not None:
            gauge.add_metric([self.role], value)
        return gauge


def _histogram(h: Histogram) -> tuple[list[tuple[str, float]], float]:
    return [(le, float(n)) for le, n in h.cumulative()], h.total


def serve_metrics(
    config: WorkerConfig, engine: Engine, controller: DPController, calls: CallCounts
) -> WSGIServer:
    """Start `/metrics` on config.host:config.metrics_port (a thread); returns the HTTP server."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(config, engine, controller, calls))
    server, _ = start_http_server(config.metrics_port, addr=config.host, registry=registry)
    return server
