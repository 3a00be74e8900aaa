"""scripts/gpu_check.sh, the prepared GPU check, runs to completion here as a dry run: every step
listed with its command, the results file written, and the gpu-marked tests found."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_dry_run_lists_every_step(tmp_path):
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    steps = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("== ")]
    assert steps == ["env", "gpu-tests", "sync-deepseek", "sync-qwen3", "up", "bench"]
    assert "tests/services/engine/test_parity.py" in run.stdout  # gpu-marked tests, found by their mark
    assert "bench/engine.py --device cuda --batches 1,16,64" in run.stdout
    results = (tmp_path / "gpu_check.md").read_text()
    assert results.count("| dry run |") == 6
