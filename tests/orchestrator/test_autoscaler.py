"""The autoscaler's settings and what it reads: its `--autoscale` grammar, the cost model's decode
capacity, and the windowed signals the API records."""

from __future__ import annotations

import time

import pytest

from orchestrator.fleet.autoscaler import AutoscalerConfig, Signals, _planned_capacity
from orchestrator.planner.group import Group
from orchestrator.planner.layout import Traffic
from orchestrator.planner.plan import decode_batch
from orchestrator.planner.specs import GPUS, MODELS


def test_settings_parse_with_defaults_and_refuse_what_makes_no_sense():
    assert AutoscalerConfig.parse("on") == AutoscalerConfig()
    config = AutoscalerConfig.parse("min=2,max=6,cold-start=1200,down-delay=90,model=deepseek-v3,gpu=h800")
    assert (config.min, config.max, config.cold_start, config.down_delay) == (2, 6, 1200.0, 90.0)
    assert (config.model, config.gpu) == ("deepseek-v3", "h800")
    bad_settings = [
        ("max=x", "not a number"), ("speed=1", "KEY=VALUE"), ("min", "KEY=VALUE"),
        ("min=3,max=2", "min <= max"), ("utilization=0.3,down-utilization=0.5", "down-utilization"),
    ]  # fmt: skip
    for bad, message in bad_settings:
        with pytest.raises(ValueError, match=message):
            AutoscalerConfig.parse(bad)


def test_decode_capacity_from_the_cost_model():
    assert _planned_capacity(AutoscalerConfig()) == {}  # without a model: the instances' reports
    config = AutoscalerConfig.parse("model=deepseek-v3,gpu=h800,decode-ep=144,itl-ms=100")
    traffic = Traffic(itl_ms=100)
    group = Group(MODELS["deepseek-v3"], GPUS["h800"], 144)
    batch, step = decode_batch(group, traffic, traffic.input_len + traffic.output_len / 2)
    held = group.decode_batch_limit(traffic.input_len + traffic.output_len)  # HBM binds at ITL 100 ms
    assert _planned_capacity(config) == {"decode": batch * 144} and batch == held > 100 and step < 0.1
    tighter = _planned_capacity(AutoscalerConfig.parse("model=deepseek-v3,gpu=h800,decode-ep=144,itl-ms=40"))
    assert 0 < tighter["decode"] < batch * 144  # a tighter ITL target fits fewer requests per GPU
    # The planner's model, precisions included: an FP8 KV cache holds more requests per GPU.
    fp8 = _planned_capacity(AutoscalerConfig.parse("model=deepseek-v3,gpu=h800,decode-ep=144,kv-cache=fp8"))
    assert fp8["decode"] > batch * 144
    # MTP: a step emits 1.85 tokens a request, so at a tight ITL target (where weights, not the
    # all-to-all, bind) more requests fit; a batch cap binds as it says.
    tight = "model=deepseek-v3,gpu=h800,decode-ep=144,itl-ms=15"
    mtp = _planned_capacity(AutoscalerConfig.parse(tight + ",mtp-draft=1,mtp-acceptance=0.85"))
    assert mtp["decode"] > _planned_capacity(AutoscalerConfig.parse(tight))["decode"] > 0
    capped = _planned_capacity(
        AutoscalerConfig.parse("model=deepseek-v3,gpu=h800,decode-ep=144,max-decode-batch=8")
    )
    assert capped == {"decode": 8 * 144}
    with pytest.raises(ValueError, match="needs drafted tokens"):
        AutoscalerConfig.parse("model=deepseek-v3,gpu=h800,decode-ep=144,mtp-acceptance=0.8")
    with pytest.raises(ValueError, match=r"experts fp8\|fp4"):
        AutoscalerConfig.parse("model=deepseek-v3,gpu=h800,decode-ep=144,experts=int4")


def test_signals_keep_a_window():
    signals = Signals(keep_s=60)
    for _ in range(10):
        signals.arrival()
    signals.first_token(0.2)
    signals.first_token(0.4)
    rate, trend = signals.rates(window=10)
    assert rate == pytest.approx(1.0) and trend == 2.0  # all arrivals in the newer half
    assert signals.p90(signals.ttft, 10) == 0.2 and signals.p90(signals.itl, 10) is None
    signals.arrivals[0] = time.monotonic() - 30  # an old arrival falls out of a short window
    assert signals.rates(window=10)[0] == pytest.approx(0.9)
