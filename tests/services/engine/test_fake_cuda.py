"""The engine's GPU path, run on the CPU on a fake GPU (`tests/fake_cuda.py`): whole steps of both
families on the device in bf16, with parameters, KV pages, routing tables and load counts there, must
mix no devices and read nothing back to the host but the sampled tokens, once per step."""

from __future__ import annotations

import pytest
import torch

from services.engine import Engine, SamplingParams
from services.engine.config import EngineConfig
from services.ep import ExpertLoadRecorder, ExpertParallel, ExpertPlacement
from services.eplb import rebalance_experts
from services.models.config import ModelConfig
from services.models.loading.loader import build_on_meta, materialize
from tests.fake_cuda import GPU, fake_gpu

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(
    max_tokens=4, temperature=0.7, top_p=0.9, top_k=5, seed=3, ignore_eos=True, logprobs=2
)


def one_rank(model_dir) -> ExpertParallel:
    """A single rank's expert view, built on the CPU at start-up (outside the fake mode)."""
    cfg = ModelConfig.from_dir(model_dir)
    return ExpertParallel.single(len(cfg.moe_layers), cfg.num_experts)


def cuda_engine(model_dir, parallel: ExpertParallel, fp8_experts: bool = False, **options) -> Engine:
    """An engine whose model, KV pages and tables sit on the fake GPU; call under `fake_gpu`."""
    cfg = ModelConfig.from_dir(model_dir)
    model = build_on_meta(cfg, parallel)
    if fp8_experts:
        for block in model.modules():
            if hasattr(block, "keep_fp8"):
                block.keep_fp8(native=True)
    materialize(model, torch.bfloat16, GPU)
    config = EngineConfig.from_options(device=str(GPU), dtype="bfloat16", page_size=4, **options)
    return Engine(model, cfg, config)


def run_steps(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], steps: int) -> int:
    """Queue the prompts, run `steps` steps; how many of them sampled tokens."""
    for prompt, p in zip(prompts, params, strict=True):
        engine.add_request(prompt, p)
    sampled = 0
    for _ in range(steps):
        sampled += bool(engine.step())
    return sampled


@pytest.mark.parametrize("chunk", [64, 8], ids=["whole-prompts", "chunked"])
def test_steps_on_cuda_mix_no_devices_and_sync_once_per_sampling_step(model_dir, monkeypatch, chunk):
    par = one_rank(model_dir)
    with fake_gpu(monkeypatch) as cuda:
        engine = cuda_engine(model_dir, par, max_prefill_tokens=chunk)
        cuda.host_to_device.clear()  # start-up's copies (tables, buffers) aside: the steps' own
        sampled = run_steps(engine, [list(range(1, 20)), list(range(3, 9))], [GREEDY, SAMPLED], steps=6)
    assert sampled >= 3  # prefill, then decode steps
    assert cuda.to_host_calls == sampled  # the sampled tokens' copy, once a step
    # The step's host inputs (and the sampler's) reach the device without blocking the host, from
    # pinned memory: one copy for the step, and one or two for sampling rows that draw.
    assert cuda.host_to_device and all(cuda.host_to_device)
    assert len(cuda.host_to_device) <= 6 * 4


def test_redundant_slots_and_a_locality_placement_route_on_the_device(model_dir, monkeypatch):
    """Replicated experts (plain route) and replicas over two nodes (the locality route)."""
    cfg = ModelConfig.from_dir(model_dir)
    layers, experts = len(cfg.moe_layers), cfg.num_experts
    weight = torch.rand(layers, experts, generator=torch.Generator().manual_seed(0)) ** 3
    slots = experts + 8
    phy2log, _, _ = rebalance_experts(weight, slots, 2, 2, 4, policy="locality")
    for placement in (
        ExpertPlacement.default(layers, experts, slots, 1),
        ExpertPlacement(experts, 1, ExpertPlacement.default(layers, experts, slots, 1).phys_to_log, 1),
        ExpertPlacement(experts, 4, phy2log, num_nodes=2).to("cpu"),
    ):
        if placement.ep_size != 1:  # one rank holding a multi-node plan's tables: route only
            with fake_gpu(monkeypatch):
                placed = placement.to(GPU)
                ids = torch.zeros(7, cfg.num_experts_per_tok, dtype=torch.long, device=GPU)
                assert placed.route(0, ids).device == GPU
            continue
        par = ExpertParallel(placement, recorder=ExpertLoadRecorder(layers, experts))
        with fake_gpu(monkeypatch) as cuda:
            engine = cuda_engine(model_dir, par)
            sampled = run_steps(engine, [list(range(2, 30))], [GREEDY], steps=3)
        assert cuda.to_host_calls == sampled


def test_expert_load_counts_stay_on_the_device_until_asked(monkeypatch):
    recorder = ExpertLoadRecorder(num_layers=2, num_experts=8)
    with fake_gpu(monkeypatch):
        recorder.to(GPU)
        recorder.record(1, torch.zeros(5, 2, dtype=torch.long, device=GPU))
        recorder.end_step(5)
        assert recorder.current.device == GPU and recorder.window[0][0].device == GPU


def test_fp8_experts_on_the_gpu_run_without_reading_group_sizes(model_dir, monkeypatch):
    par = one_rank(model_dir)
    with fake_gpu(monkeypatch) as cuda:
        engine = cuda_engine(model_dir, par, fp8_experts=True)
        sampled = run_steps(engine, [list(range(2, 12))], [GREEDY], steps=2)
    assert cuda.to_host_calls == sampled
