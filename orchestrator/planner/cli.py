"""`moeserve plan`: which EP width per role, how many groups, at what latency and cost.

    moeserve plan --model deepseek-v3|deepseek-r1|kimi-k2|qwen3-235b|DIR --gpu h800|...|mi355x|FILE.json
                  (or --gpu-spec FILE.json)
                  [--request-rate R] [--input-len I] [--output-len O] [--cache-hit F]
                  [--ttft-ms T] [--itl-ms T] [--prefill-ep P] [--decode-ep D]
                  [--kv-cache bf16|fp8] [--experts fp8|fp4] [--attention bf16|fp8]
                  [--prefill-parallel ep|tp|dp] [--mtp-draft N --mtp-acceptance A] [--offload-gb G]
                  [--max-decode-batch B] [--no-two-batch-overlap]
                  [--current-layout P/D] [--margin 0.10] [--sensitivity]
                  [--output table|json] [--plot FILE.svg]

JSON (`--output json`), for scripts (docs/planner.md, "JSON contract"):
    {"version": 2, "inputs": {"model", "model_arg", "gpu", "gpus_per_node", "nvlink_domain", "traffic",
                              "prefill_eps", "decode_eps"},
     "layouts": [{"prefill_ep", "decode_ep", "prefill_groups", "decode_groups", "gpus",
                  "input_tokens_per_s_per_node", "output_tokens_per_s_per_node",
                  "input_tokens_per_s_per_gpu", "output_tokens_per_s_per_gpu", "ttft_ms",
                  "itl_ms", "usd_per_million_output_tokens", "decode_batch_per_gpu",
                  "decode_step_ms", "prefill_chunk_per_gpu", "prefill_utilization"}, ...],
     "recommendation": {same fields}, "why": str,
     "reason": {"rule", "layouts_compared", "ttft_ms_target", "itl_ms_target", "runner_up", "margin",
                "kept"},
     "crossover_request_rate": number | null,
     "skipped": [{"code", "role", "ep", "message"}, ...],
     "sensitivity": [{"knob", "value", "default", "why", "layout", "cost_ratio",
                      "output_per_node_ratio"}, ...]  (with --sensitivity)}
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from collections.abc import Sequence

    from orchestrator.planner.layout import Traffic
    from orchestrator.planner.specs import GpuSpec, ModelSpec

Opt = typer.Option
JSON_VERSION = 2
"""Of `--output json`: 2 added `version`, `inputs`, `reason`, the per-GPU operating point of each
layout and `skipped` as objects with a `code`."""


def plan_command(
    model: Annotated[str, Opt(help="deepseek-v3, deepseek-r1, kimi-k2, qwen3-235b, or a checkpoint dir")],
    gpu: Annotated[
        str,
        Opt(
            help="h800, h100, h200, b200, b300, h20, gb200-nvl72, gb300-nvl72, mi300x, mi355x, or a JSON "
            "spec file (docs/planner.md: GPU spec files)"
        ),
    ] = "",
    gpu_spec_file: Annotated[
        Path | None, Opt("--gpu-spec", help="a JSON GPU spec file (the same as --gpu FILE.json)")
    ] = None,
    request_rate: Annotated[
        float | None, Opt(help="requests/s to serve (default: each layout at its full load)", min=0.0001)
    ] = None,
    input_len: Annotated[float, Opt(help="prompt tokens per request", min=1)] = 4384,
    output_len: Annotated[float, Opt(help="output tokens per request", min=1)] = 1211,
    cache_hit: Annotated[
        float, Opt(help="share of prompt tokens found in the prefix cache", min=0, max=0.99)
    ] = 0.0,
    ttft_ms: Annotated[float, Opt(help="time-to-first-token target", min=1)] = 5000,
    itl_ms: Annotated[float, Opt(help="inter-token latency target", min=1)] = 100,
    prefill_ep: Annotated[int | None, Opt(help="evaluate this prefill EP width only", min=1)] = None,
    decode_ep: Annotated[int | None, Opt(help="evaluate this decode EP width only", min=1)] = None,
    length_cv: Annotated[float, Opt(help="coefficient of variation of request lengths", min=0)] = 1.0,
    balancedness: Annotated[
        float, Opt(help="EPLB balancedness (mean / max rank load)", min=0.1, max=1)
    ] = 0.77,
    usd_per_gpu_hour: Annotated[float, Opt(help="price of one GPU-hour", min=0)] = 2.0,
    kv_cache: Annotated[str, Opt(help="the KV cache's precision: bf16 or fp8")] = "bf16",
    experts: Annotated[str, Opt(help="the routed experts' precision: fp8 or fp4 (NVFP4)")] = "fp8",
    attention: Annotated[str, Opt(help="the attention cores' precision: bf16 or fp8")] = "bf16",
    prefill_parallel: Annotated[
        str, Opt(help="prefill groups: ep (DP attention + EP MoE), tp (all TP) or dp (DP attention + TP MoE)")
    ] = "ep",
    mtp_draft: Annotated[int, Opt(help="tokens the MTP module drafts a decode step (0: no MTP)", min=0)] = 0,
    mtp_acceptance: Annotated[
        float, Opt(help="acceptance rate of each drafted token (DeepSeek reports 0.85-0.9)", min=0, max=1)
    ] = 0.0,
    offload_gb: Annotated[
        float, Opt(help="weights per prefill GPU kept in host memory and streamed in every step", min=0)
    ] = 0.0,
    max_decode_batch: Annotated[
        int, Opt(help="requests a decode GPU runs at once at most (the largest CUDA graph)", min=1)
    ] = 256,
    two_batch_overlap: Annotated[
        bool, Opt(help="two micro-batches hide the all-to-all behind compute")
    ] = True,
    current_layout: Annotated[
        str | None, Opt(help="the layout in use, PREFILL_EP/DECODE_EP: kept while within --margin")
    ] = None,
    sensitivity: Annotated[
        bool, Opt("--sensitivity", help="also how far each unpublished knob moves the answer")
    ] = False,
    margin: Annotated[
        float, Opt(help="how much more per token the layout in use may cost than the cheapest", min=0, max=1)
    ] = 0.10,
    output: Annotated[str, Opt(help="table or json")] = "table",
    plot: Annotated[
        Path | None, Opt(help="write cost per million output tokens against request rate (.svg)")
    ] = None,
) -> None:
    from orchestrator.planner.cost import Precision, Techniques
    from orchestrator.planner.layout import Infeasible, Traffic
    from orchestrator.planner.plan import DECODE_WIDTHS, PREFILL_WIDTHS, plan
    from orchestrator.planner.specs import SpecError, gpu_spec, model_spec

    if bool(gpu) == bool(gpu_spec_file):
        _fail("name the GPU once: --gpu KEY (or FILE.json), or --gpu-spec FILE.json")
    gpu = gpu or str(gpu_spec_file)
    if output not in ("table", "json"):
        _fail(f"--output must be table or json, not {output!r}")
    if plot is not None and plot.suffix.lower() != ".svg":
        _fail(f"--plot writes SVG: give a file ending in .svg, not {plot.name!r}")
    try:
        precision = Precision(kv_cache, experts, attention)
        techniques = Techniques(prefill_parallel, mtp_draft, mtp_acceptance, offload_gb, max_decode_batch,
                                two_batch_overlap)  # fmt: skip
    except ValueError as e:
        _fail(str(e))
    traffic = Traffic(request_rate, input_len, output_len, cache_hit, length_cv, ttft_ms, itl_ms,
                      balancedness, usd_per_gpu_hour, precision, techniques)  # fmt: skip
    prefill_eps = (prefill_ep,) if prefill_ep else PREFILL_WIDTHS
    decode_eps = (decode_ep,) if decode_ep else DECODE_WIDTHS
    keep = None
    if current_layout is not None:
        p, _, d = current_layout.partition("/")
        if not (p.isdigit() and d.isdigit()):
            _fail(f"--current-layout is PREFILL_EP/DECODE_EP, e.g. 32/144, not {current_layout!r}")
        keep = (int(p), int(d))
    try:
        spec, hardware = model_spec(model), gpu_spec(gpu)
        result = plan(spec, hardware, traffic, prefill_eps, decode_eps, keep=keep, margin=margin)
    except (SpecError, Infeasible) as e:
        _fail(str(e))
    rows = None
    if sensitivity:
        from orchestrator.planner.sensitivity import sensitivity as knobs

        rows = knobs(spec, hardware, traffic, prefill_eps, decode_eps)
    if plot is not None:
        from orchestrator.planner.plot import cost_curves

        plot.write_text(cost_curves(spec, hardware, traffic, prefill_eps, decode_eps))
    if output == "json":
        print(
            json.dumps(
                json_body(spec, model, hardware, traffic, prefill_eps, decode_eps, result, rows), indent=2
            )
        )
        return
    _table(result, spec.name, hardware.name, traffic)
    for row in rows or ():
        cost = "-" if row["cost_ratio"] is None else f"{row['cost_ratio']:.2f}x cost"
        output = (
            ""
            if row["output_per_node_ratio"] is None
            else f", {row['output_per_node_ratio']:.2f}x output/node"
        )
        mark = " (default)" if row["default"] else ""
        layout = row["layout"] or "nothing serves"
        print(f"sensitivity: {row['knob']}={row['value']:g}{mark}: {layout}, {cost}{output}")
    if plot is not None:
        print(f"wrote {plot}")


def json_body(spec: ModelSpec, model_arg: str, hardware: GpuSpec, traffic: Traffic,
              prefill_eps: Sequence[int], decode_eps: Sequence[int], result: dict[str, Any],
              sensitivity: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """`--output json`'s body (the contract above) for a `plan` result."""
    inputs = {
        "model": spec.name, "model_arg": model_arg, "gpu": hardware.name,
        "gpus_per_node": hardware.gpus_per_node, "nvlink_domain": hardware.domain,
        "traffic": dataclasses.asdict(traffic),
        "prefill_eps": list(prefill_eps), "decode_eps": list(decode_eps),
    }  # fmt: skip
    body = {"version": JSON_VERSION, "inputs": inputs, **result}
    body["layouts"] = [x.as_json() for x in result["layouts"]]
    body["recommendation"] = result["recommendation"].as_json()
    body["skipped"] = [e.as_json() for e in result["skipped"]]
    if sensitivity is not None:
        body["sensitivity"] = sensitivity
    return body


def _table(result: dict[str, Any], model: str, gpu: str, traffic: Traffic) -> None:
    from rich.console import Console
    from rich.table import Table

    rate = f"{traffic.request_rate:g} requests/s" if traffic.request_rate else "full load"
    table = Table(title=f"{model} on {gpu}, {rate}")
    for col in ("prefill EP", "decode EP", "groups P/D", "GPUs", "input tok/s/node", "output tok/s/node",
                "TTFT ms", "ITL ms", "$/M output"):  # fmt: skip
        table.add_column(col, justify="right")
    best = result["recommendation"]
    for x in sorted(result["layouts"], key=lambda x: (x.prefill_ep, x.decode_ep)):
        mark = " *" if x is best else ""
        table.add_row(
            str(x.prefill_ep), str(x.decode_ep), f"{x.prefill_groups}/{x.decode_groups}", str(x.gpus),
            f"{x.input_tokens_per_s_per_node:,.0f}", f"{x.output_tokens_per_s_per_node:,.0f}",
            f"{x.ttft_ms:,.0f}", f"{x.itl_ms:,.0f}", f"{x.usd_per_million_output_tokens:.3f}{mark}",
        )  # fmt: skip
    console = Console(width=130)
    console.print(table)
    console.print(
        f"recommended: prefill EP{best.prefill_ep} x{best.prefill_groups}, "
        f"decode EP{best.decode_ep} x{best.decode_groups} ({best.gpus} GPUs): {result['why']}"
    )
    console.print("  " + "; ".join(best.notes))
    cross = result["crossover_request_rate"]
    if cross is not None:
        console.print(f"wider layouts become the cheapest above {cross:.3g} requests/s")
    elif len(result["layouts"]) > 1:
        console.print("the narrowest cheap layout stays the cheapest at every rate up to 100,000 requests/s")
    for line in result["skipped"]:
        console.print(f"[dim]skipped: {line}[/dim]")


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)
