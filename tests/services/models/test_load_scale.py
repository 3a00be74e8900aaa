"""Loading at EP4 from a ~250 MB checkpoint: each rank reads its experts and the dense weights
only, and its memory peaks close to its final weights."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

from services.ep import ExpertParallel, ExpertPlacement, create
from services.models import load_model
from services.models.loading.checkpoint import Checkpoint
from services.tools.synthetic import random_config, write_random_checkpoint
from tests.ranks import run_ranks

EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory) -> Path:
    config = random_config(hidden=1024, experts=64, layers=2)  # one dense layer, one MoE layer
    return write_random_checkpoint(tmp_path_factory.mktemp("big") / "m", config, max_shard_bytes=64 << 20)


def _status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (VmRSS now, VmHWM peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def load_rank(rank: int, world: int, model_dir: str) -> dict:
    dispatcher = create("torch")

    def parallel(cfg):
        placement = ExpertPlacement.default(len(cfg.moe_layers), cfg.num_experts, cfg.num_experts, world)
        return ExpertParallel(placement, rank, dispatcher)

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status("VmRSS")
    model, _ = load_model(model_dir, dtype=torch.bfloat16, parallel=parallel)
    rep = model.load_report
    return {"read": rep.bytes_read, "weights": rep.weight_bytes, "growth": _status("VmHWM") - before}


def test_each_ep4_rank_reads_its_share_and_peaks_near_its_weights(big_dir):
    entries = Checkpoint(big_dir).entries.values()
    total = sum(e.nbytes for e in entries)
    experts = sum(e.nbytes for e in entries if EXPERT.search(e.name))
    assert total >= 200e6 and experts > total / 2
    allowed = (experts / 4 + (total - experts)) * 1.05
    for rank, r in enumerate(run_ranks(4, load_rank, str(big_dir))):
        assert r["read"] <= allowed, (rank, r["read"], allowed)
        assert r["read"] >= (experts / 4 + (total - experts)) * 0.99  # and it did read all of that
        assert r["growth"] <= 1.3 * r["weights"], (rank, r)


def test_a_long_load_reports_its_progress_in_a_few_lines(big_dir, monkeypatch):
    import services.models.loading.reading as reading

    monkeypatch.setattr(reading, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(reading, "PROGRESS_EVERY_S", 0.02)
    # A long load whatever the disk: from the page cache this checkpoint can load within one period.
    for method in ("read", "read_into"):
        fast = getattr(Checkpoint, method)
        monkeypatch.setattr(Checkpoint, method, lambda *a, _f=fast, **k: (time.sleep(0.002), _f(*a, **k))[1])
    lines: list[str] = []
    start = time.monotonic()
    load_model(big_dir, dtype=torch.bfloat16, report=lines.append)
    elapsed = time.monotonic() - start
    assert lines and all(re.fullmatch(r"loading weights: \d+% \(\d+s\)", line) for line in lines), lines
    percents = [int(line.split()[2].rstrip("%")) for line in lines]
    assert percents == sorted(percents) and percents[-1] <= 100
    assert len(lines) <= elapsed / 0.02 + 2  # one line per period, not one per tensor
