"""Issue 28: the cost model predicts what it was not fitted to. Its three free constants are the fit
of the Hopper publications marked `fitted`, and nothing else; every other publication, each
Blackwell one among them, is a held-out check the model must land within 25% of (the fitted
rows within 15%)."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.planner.cost import FITTED, FITTED_FIELDS
from orchestrator.planner.fit import fit, landed
from orchestrator.planner.publications import HOPPER, PUBLICATIONS, predict

ROOT = Path(__file__).resolve().parents[3]


def test_six_or_more_publications_a_third_held_out_and_blackwell_only_as_checks():
    assert len(PUBLICATIONS) >= 6
    held_out = [p for p in PUBLICATIONS if not p.fitted]
    assert len(held_out) * 3 >= len(PUBLICATIONS)
    assert all(p.hopper for p in PUBLICATIONS if p.fitted)
    assert any(not p.hopper for p in held_out)  # Blackwell is checked, never fitted
    assert any(p.hopper for p in held_out)  # and Hopper too: prediction on the fitted generation
    assert len(FITTED_FIELDS) < sum(
        len(p.rows) for p in PUBLICATIONS if p.fitted
    )  # fewer constants than points
    for p in PUBLICATIONS:
        assert p.url.startswith("https://") and p.title and p.date[:4] in ("2025", "2026"), p.key
        assert all(r.gpu in HOPPER for r in p.rows) == p.hopper


def test_fitted_rows_land_within_15_percent_and_held_out_rows_within_25():
    for row in landed():
        assert row.ratio is not None, (row.publication.key, row.row)
        limit = 0.15 if row.publication.fitted else 0.25
        assert abs(row.ratio - 1) <= limit, (row.publication.key, row.row.phase, row.row.label, row.ratio)


def test_the_constants_are_the_fit_of_the_fitted_hopper_publications_alone():
    assert fit() == FITTED  # cost.py's constants are what the fit finds, to two decimals
    # Held-out rows set nothing: doubling every held-out figure leaves the fit as it was.
    doubled = tuple(
        p if p.fitted else replace(p, rows=tuple(replace(r, published=2 * r.published) for r in p.rows))
        for p in PUBLICATIONS
    )
    assert fit(doubled) == FITTED
    # And a fitted figure does move it: the fit follows what it is given.
    ds = next(p for p in PUBLICATIONS if p.key == "deepseek-day6")
    halved = replace(ds, rows=tuple(replace(r, published=r.published * 0.7) for r in ds.rows))
    assert fit([halved if p is ds else p for p in PUBLICATIONS]) != FITTED


def test_a_blackwell_publication_cannot_set_a_constant():
    gb200 = next(p for p in PUBLICATIONS if not p.hopper)
    with pytest.raises(ValueError, match="only Hopper publications"):
        fit([*PUBLICATIONS, replace(gb200, fitted=True)])
    with pytest.raises(ValueError, match="no publication is marked fitted"):
        fit([p for p in PUBLICATIONS if not p.fitted])


def test_each_stated_technique_moves_its_row_the_physical_way():
    """The inputs the held-out rows state (FP4 experts, FP8 KV and attention, MTP, offload, TP
    prefill, no two-batch overlap) each change the prediction in the direction they should."""
    rows = {(p.key, r.phase, r.label): r for p in PUBLICATIONS for r in p.rows}
    h20 = rows[("sglang-h20", "decode", "")]
    mtp = h20.traffic.techniques
    no_mtp = replace(
        h20, traffic=replace(h20.traffic, techniques=replace(mtp, mtp_draft=0, mtp_acceptance=0))
    )
    # MTP: each request gains 1.85 tokens a step for a dearer step. On the compute-poor H20 the
    # absorbed MLA is compute-bound, so verifying two tokens costs about twice the attention and
    # MTP gains little; where weights and KV reads bind (H100, 16 requests a GPU) it gains most.
    assert predict(h20) < 1.1 * predict(no_mtp)
    small = replace(h20, gpu="h100", batch=16)
    assert predict(small) > 1.3 * predict(replace(no_mtp, gpu="h100", batch=16))
    gb = rows[("sglang-gb200-1", "decode", "")]
    on = replace(gb.traffic.techniques, two_batch_overlap=True)
    overlapped = replace(gb, traffic=replace(gb.traffic, techniques=on))
    assert predict(overlapped) > predict(gb)
    fp4 = rows[("sglang-gb200-2", "decode", "NVFP4 experts, FP8 KV and attention")]
    fp8 = rows[("sglang-gb200-2", "decode", "FP8 experts, BF16 KV and attention")]
    assert predict(fp4) > predict(fp8)


def test_the_bench_prints_fitted_and_held_out_rows_apart_with_their_sources():
    run = subprocess.run([sys.executable, str(ROOT / "bench/planner.py"), "--repeats", "1"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = run.stdout
    fitted, held_out = out.index("Fitted rows"), out.index("Held-out rows")
    assert fitted < held_out
    for p in PUBLICATIONS:
        section = out[fitted:held_out] if p.fitted else out[held_out:]
        assert p.url in section, p.key
    assert "refit on the fitted rows: " in out and "same as FITTED" in out


def test_the_docs_quote_the_code_and_a_stale_figure_fails_the_check(tmp_path):
    """docs/planner.md's figures are generated (scripts/planner_docs.py); `make lint` runs its
    --check on the real page, and here a page with one figure changed by hand fails it."""
    text = (ROOT / "docs/planner.md").read_text()
    assert f"| `attention` | {FITTED.attention:g} | **fitted** |" in text
    block = text.index("<!-- generated:example -->")
    figure = next(re.finditer(r"\*\*([0-9,]+)\*\*", text[block:]))  # a bold figure of the example
    doc = tmp_path / "planner.md"
    doc.write_text(text[: block + figure.start()] + "**1**" + text[block + figure.end() :])
    script = [sys.executable, str(ROOT / "scripts/planner_docs.py"), "--check", "--doc", str(doc)]
    run = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "out of date" in run.stderr
