"""`make bench`'s runner: it rewrites exactly the marked blocks of the benchmarks document."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bench_all", ROOT / "bench" / "all.py")
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)


def test_blocks_are_replaced_and_the_prose_kept():
    doc = "# B\n\nprose a\n<!-- bench:x (old) -->\nold\n<!-- /bench:x -->\n"
    doc += "prose b\n<!-- bench:y -->\nkeep\n<!-- /bench:y -->\n"
    new = runner.block("x", "| a |\n|---|\n| 1 |\ntotal 1\n", "base", "2026-01-01", "here", 0, 2.0)
    out = runner.rewrite(doc, {"x": new})
    assert "old" not in out and "prose a" in out and "prose b" in out and "keep" in out
    assert "| 1 |\n\n```\ntotal 1\n```" in out and "Baseline of the ratios: base" in out
    assert runner.rewrite(out, {}) == out
    failed = runner.block("z", "Traceback\nboom\n", "base", "2026-01-01", "here", 3, 1.0)
    appended = runner.rewrite(doc, {"z": failed})
    assert appended.startswith(doc) and "exit 3" in appended and "`boom`" in appended


def test_every_benchmark_script_is_listed_and_the_document_marks_each(tmp_path):
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"all"}
    assert scripts == {runner.SCRIPTS.get(name, name) for name in runner.BENCHES}
    marked = {m.group("name") for m in runner.BLOCK.finditer((ROOT / "docs" / "benchmarks.md").read_text())}
    assert marked == set(runner.BENCHES)
    doc = tmp_path / "b.md"
    doc.write_text("x\n<!-- bench:planner -->\nold\n<!-- /bench:planner -->\ny\n")
    args = [sys.executable, str(ROOT / "bench" / "all.py"), "--only", "planner", "--doc", str(doc)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    text = doc.read_text()
    assert (
        "\nold\n" not in text and "deepseek-day6" in text and text.startswith("x\n") and text.endswith("y\n")
    )
