"""Generate every figure docs/planner.md quotes from the planner's own code.

    python scripts/planner_docs.py           # rewrite the generated blocks
    python scripts/planner_docs.py --check   # exit 1 if docs/planner.md is out of date (make lint)
    python scripts/planner_docs.py --check --doc OTHER.md

A block sits between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`; the prose around the
blocks quotes no figure of the model's, so a change to the model shows up here or fails the check.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator.planner.cli import json_body
from orchestrator.planner.cost import FITTED, FITTED_FIELDS, Precision, Techniques
from orchestrator.planner.fit import fit, landed, markdown
from orchestrator.planner.group import Group
from orchestrator.planner.layout import Traffic
from orchestrator.planner.plan import (
    DECODE_WIDTHS,
    MARGIN,
    PREFILL_WIDTHS,
    _cheapest,
    _feasible,
    _kept,
    decode_batch,
    decode_context,
    evaluate,
    plan,
    prefill_context,
)
from orchestrator.planner.publications import PUBLICATIONS
from orchestrator.planner.sensitivity import KNOBS, sensitivity
from orchestrator.planner.specs import GPUS, MODELS

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "planner.md"
BLOCK = re.compile(r"(<!-- generated:(?P<name>[a-z_]+) -->\n).*?(<!-- /generated:(?P=name) -->)", re.S)
DS_MODEL, H800 = MODELS["deepseek-v3"], GPUS["h800"]
DEEPSEEK = next(p for p in PUBLICATIONS if p.key == "deepseek-day6").rows[0].traffic


def field_docs(path: Path, cls: str) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` in `path`, first sentence-ish line."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    out, last = {}, None
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            last = item.target.id
        elif isinstance(item, ast.Expr) and isinstance(item.value, ast.Constant) and last:
            out[last] = " ".join(str(item.value.value).split())
            last = None
    return out


def constants() -> str:
    docs = field_docs(ROOT / "orchestrator/planner/cost.py", "Efficiency")
    lines = ["| constant | value | how | what it is |", "|---|---:|---|---|"]
    for name, text in docs.items():
        how = "**fitted**" if name in FITTED_FIELDS else "set"
        lines.append(f"| `{name}` | {getattr(FITTED, name):g} | {how} | {text} |")
    return "\n".join(lines)


def publications() -> str:
    rows = landed()
    out = ["**Fitted rows** (Hopper; these set the three fitted constants):", ""]
    out += markdown([x for x in rows if x.publication.fitted])
    out += ["", "**Held-out rows** (checks: no constant is fitted on them):", ""]
    out += markdown([x for x in rows if not x.publication.fitted])
    out += ["", "What each publication states, and what the rows take for what it leaves out:", ""]
    for p in PUBLICATIONS:
        kind = "fitted" if p.fitted else "held out"
        out.append(f"- **{p.title}** ({p.date}, {kind}): {p.notes}. Unstated: {p.assumed}.")
    return "\n".join(out)


def balancedness() -> str:
    """The fit and its errors if every publication's (unstated) balancedness were another value."""
    lines = ["| balancedness at EP144 | fitted constants | worst fitted | worst held-out | mean held-out |",
             "|---:|---|---:|---:|---:|"]  # fmt: skip
    for value in (0.55, 0.77, 0.85, 0.95):
        pubs = tuple(
            replace(p, rows=tuple(replace(r, traffic=replace(r.traffic, balancedness=value)) for r in p.rows))
            for p in PUBLICATIONS
        )
        eff = fit(pubs)
        rows = landed(pubs, eff)
        fitted = [abs((x.ratio or 0) - 1) for x in rows if x.publication.fitted]
        held = [abs((x.ratio or 0) - 1) for x in rows if not x.publication.fitted]
        found = ", ".join(f"{k} {getattr(eff, k):g}" for k in FITTED_FIELDS)
        mark = " (default)" if value == Traffic().balancedness else ""
        lines.append(f"| {value:g}{mark} | {found} | {max(fitted):.0%} | {max(held):.0%} | "
                     f"{sum(held) / len(held):.0%} |")  # fmt: skip
    return "\n".join(lines)


def gpus() -> str:
    lines = ["| key | GPU | HBM GiB | TB/s | FP8 / BF16 / FP4 dense TFLOPS | NVLink GB/s | NIC GB/s "
             "| host GB/s | GPUs per node / NVLink domain |",
             "|---|---|---:|---:|---|---:|---:|---:|---|"]  # fmt: skip
    for key, g in GPUS.items():
        fp4 = f"{g.fp4_tflops:,.0f}" if g.fp4_tflops else "-"
        lines.append(f"| `{key}` | {g.name} | {g.hbm_gb:g} | {g.hbm_tb_s:g} | {g.fp8_tflops:,.0f} / "
                     f"{g.bf16_tflops:,.0f} / {fp4} | {g.nvlink_gb_s:g} | {g.nic_gb_s:g} | {g.host_gb_s:g} | "
                     f"{g.gpus_per_node} / {g.domain} |")  # fmt: skip
    return "\n".join(lines)


def json_example() -> str:
    traffic = Traffic(request_rate=50)
    result = plan(DS_MODEL, H800, traffic)
    body = json_body(DS_MODEL, "deepseek-v3", H800, traffic, PREFILL_WIDTHS, DECODE_WIDTHS, result)
    body["layouts"] = [*body["layouts"][:1], "... one object per feasible layout"]
    body["skipped"] = [*body["skipped"][:1], "..."]
    text = json.dumps(body, indent=1)
    command = "moeserve plan --model deepseek-v3 --gpu h800 --request-rate 50 --output json"
    return f"`{command}`:\n\n```json\n{text}\n```"


def worked_example() -> str:
    t = DEEPSEEK
    dec = Group(DS_MODEL, H800, 144, balancedness=t.balancedness)
    pre = Group(DS_MODEL, H800, 32, balancedness=t.balancedness)
    batch, step = decode_batch(dec, t, decode_context(t))
    parts = dec.decode_parts(batch, decode_context(t))
    held = dec.decode_batch_limit(t.input_len + t.output_len)
    out = [
        f"DeepSeek's decode (EP144 on H800, its day's lengths, ITL {t.itl_ms:g} ms): each GPU holds "
        f"{dec.weight_bytes() / 1e9:.1f} GB of weights ({dec.slots_per_rank} routed slots), which leaves "
        f"room for the whole KV of {held} requests; the ITL target allows {batch}. Balance at this width: "
        f"{dec.balance:.3f}. One step at {decode_context(t):,.0f} tokens of context:",
        "",
        "| part | ms |",
        "|---|---:|",
    ]
    for name in ("replicated", "experts", "attention", "compute", "comm", "total"):
        out.append(f"| {name} | {parts[name] * 1e3:.1f} |")
    out += ["", f"A node delivers 8 x {batch} / {step:.4f} s = **{8 * batch / step:,.0f}** output tokens/s."]
    pparts = pre.prefill_parts(prefill_context(t))
    out += ["", f"Prefill (EP32, balance {pre.balance:.3f}), one new token at {prefill_context(t):,.0f} "
            "tokens of average context:", "", "| part | us |", "|---|---:|"]  # fmt: skip
    for name in ("dense", "routed", "attention", "comm", "total"):
        out.append(f"| {name} | {pparts[name] * 1e6:.1f} |")
    layout = evaluate(DS_MODEL, H800, t, 32, 144)
    out += ["", f"At its operating point ({layout.prefill_chunk_per_gpu:,} tokens a GPU a step, run at "
            f"{layout.prefill_utilization:.0%} so that TTFT stays within {t.ttft_ms / 1e3:g} s) a node "
            f"takes **{layout.input_tokens_per_s_per_node:,.0f}** input tokens/s, cache hits "
            "included."]  # fmt: skip
    return "\n".join(out)


def sensitivity_table() -> str:
    traffic = Traffic(request_rate=1000)
    base = plan(DS_MODEL, H800, traffic)["recommendation"]
    rows = sensitivity(DS_MODEL, H800, traffic, PREFILL_WIDTHS, DECODE_WIDTHS)
    out = [f"DeepSeek-V3 on H800s at 1,000 requests/s, DeepSeek's lengths (`moeserve plan --model "
           f"deepseek-v3 --gpu h800 --request-rate 1000 --sensitivity`); the defaults' answer is prefill "
           f"EP{base.prefill_ep} / decode EP{base.decode_ep}. Costs come in whole groups, so small "
           "changes can round away.", "",
           "| knob | value | layout P/D | cost x | output per node x | why these values |",
           "|---|---:|---|---:|---:|---|"]  # fmt: skip
    seen = set()
    for r in rows:
        why = "" if r["knob"] in seen else KNOBS[r["knob"]][2]
        seen.add(r["knob"])
        value = f"{r['value']:g}" + (" (default)" if r["default"] else "")
        cost = "-" if r["cost_ratio"] is None else f"{r['cost_ratio']:.2f}"
        output = "-" if r["output_per_node_ratio"] is None else f"{r['output_per_node_ratio']:.2f}"
        out.append(
            f"| {r['knob']} | {value} | {r['layout'] or 'nothing serves'} | {cost} | {output} | {why} |"
        )
    return "\n".join(out)


def walk(margin: float) -> tuple[int, int]:
    """DeepSeek's traffic on H800s, 65 -> 2,900 requests/s in 3% steps: (times the cheapest layout
    changes, times the kept recommendation changes)."""
    rate, keep, last, cheapest_changes, kept_changes = 65.0, None, None, 0, 0
    while rate <= 2900:
        layouts = _feasible(
            DS_MODEL, H800, Traffic(request_rate=rate), PREFILL_WIDTHS, DECODE_WIDTHS, FITTED
        )[0]
        best = _cheapest(layouts)
        rec = (_kept(layouts, keep, best, margin) if keep else None) or best
        key, rec_key = (best.prefill_ep, best.decode_ep), (rec.prefill_ep, rec.decode_ep)
        cheapest_changes += last is not None and key != last
        kept_changes += keep is not None and rec_key != keep
        last, keep, rate = key, rec_key, rate * 1.03
    return cheapest_changes, kept_changes


def stability() -> str:
    cheap, kept = walk(MARGIN)
    _, kept5 = walk(0.05)
    low, high = (plan(DS_MODEL, H800, Traffic(request_rate=r)) for r in (1, 1000))
    lo, hi = low["recommendation"], high["recommendation"]
    return "\n".join([
        f"- On DeepSeek's traffic with H800s, walking 65 -> 2,900 requests/s in 3% steps, the cheapest "
        f"layout changes {cheap} times; the kept recommendation changes {kept} times at the default "
        f"{MARGIN:.0%} margin ({kept5} at 5%).",
        f"- At 1 request/s the recommendation is prefill EP{lo.prefill_ep} / decode EP{lo.decode_ep} "
        f"(${lo.usd_per_million_output_tokens:.2f} per million output tokens); wider from "
        f"**{low['crossover_request_rate']:.3g} requests/s** (the regime change).",
        f"- At 1,000 requests/s: prefill EP{hi.prefill_ep} x{hi.prefill_groups} / decode EP{hi.decode_ep} "
        f"x{hi.decode_groups} (${hi.usd_per_million_output_tokens:.2f}).",
    ])  # fmt: skip


def techniques() -> str:
    h100 = GPUS["h100"]

    def at(traffic: Traffic, gpu: str = "h100", p: int = 16, d: int = 32) -> str:
        x = evaluate(DS_MODEL, GPUS[gpu], replace(traffic, request_rate=50), p, d)
        return (f"{x.decode_batch_per_gpu} requests a GPU, {x.output_tokens_per_s_per_node:,.0f} output "
                f"tokens/s per decode node, ${x.usd_per_million_output_tokens:.2f}")  # fmt: skip

    fp8 = Traffic(precision=Precision(kv_cache="fp8"))
    both = Traffic(precision=Precision(kv_cache="fp8", experts="fp4"))
    mtp = Traffic(techniques=Techniques(mtp_draft=1, mtp_acceptance=0.85))
    rack = plan(
        DS_MODEL, GPUS["gb200-nvl72"], Traffic(request_rate=100, precision=Precision("fp8", "fp4", "fp8"))
    )
    r = rack["recommendation"]
    tp = plan(DS_MODEL, GPUS["h200"], Traffic(request_rate=20, techniques=Techniques(prefill_parallel="tp")),
              prefill_eps=(8,))["recommendation"]  # fmt: skip
    return "\n".join([
        f"DeepSeek-V3 on {h100.name}s at 50 requests/s, prefill EP16 / decode EP32:",
        "",
        f"- BF16 KV cache: {at(Traffic())} per million output tokens (whole groups: costs move in steps);",
        f"- `--kv-cache fp8`: {at(fp8)};",
        f"- `--kv-cache fp8 --experts fp4` (no FP4 tensor cores on H100: memory only): {at(both)};",
        f"- `--mtp-draft 1 --mtp-acceptance 0.85`: {at(mtp)}.",
        "",
        f"A GB200 NVL72 rack with NVFP4 experts, FP8 KV and FP8 attention at 100 requests/s "
        f"(`--gpu gb200-nvl72 --experts fp4 --kv-cache fp8 --attention fp8`): prefill EP{r.prefill_ep} "
        f"x{r.prefill_groups} / decode EP{r.decode_ep} x{r.decode_groups}, "
        f"{r.output_tokens_per_s_per_node:,.0f} output tokens/s per tray of 4, "
        f"${r.usd_per_million_output_tokens:.3f} per million output tokens.",
        "",
        f"TP8 prefill on H200s at 20 requests/s (`--prefill-parallel tp --prefill-ep 8`): decode "
        f"EP{tp.decode_ep}, {tp.input_tokens_per_s_per_node:,.0f} input tokens/s per prefill node.",
    ])  # fmt: skip


BLOCKS: dict[str, Callable[[], str]] = {
    "json": json_example, "constants": constants, "publications": publications, "gpus": gpus,
    "example": worked_example, "sensitivity": sensitivity_table, "stability": stability,
    "techniques": techniques, "balancedness": balancedness,
}  # fmt: skip


def render(text: str) -> str:
    names = {m.group("name") for m in BLOCK.finditer(text)}
    if names != set(BLOCKS):
        raise SystemExit(f"docs/planner.md's blocks {sorted(names)} are not {sorted(BLOCKS)}")
    return BLOCK.sub(lambda m: m.group(1) + BLOCKS[m.group("name")]() + "\n" + m.group(3), text)


def main() -> None:
    doc = Path(sys.argv[sys.argv.index("--doc") + 1]) if "--doc" in sys.argv else DOC
    text = doc.read_text()
    new = render(text)
    if "--check" in sys.argv:
        if new != text:
            print(f"{doc} is out of date: run python scripts/planner_docs.py", file=sys.stderr)
            raise SystemExit(1)
        return
    doc.write_text(new)


if __name__ == "__main__":
    main()
