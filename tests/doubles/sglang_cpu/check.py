"""Checks with SGLang's own code, in a process of their own (SGLang patches transformers on import):

    python -m tests.doubles.sglang_cpu.check < REQUEST.json > ANSWER.json

REQUEST: {"commands": [[arg, ...], ...], "expert_location": [[arg, ...], ...]}

- each of `commands` is a `sglang.launch_server` command line after `-m sglang.launch_server`: it is
  parsed with `prepare_server_args` and resolved (`resolve_once`, SGLang's start-up checks that need
  no GPU); the answer is the resolved facts a deployment depends on, or the error SGLang raised;
- each of `expert_location` is such a command line with `--init-expert-location`: the expert
  placement it names is loaded as a scheduler loads it (`compute_initial_expert_location_metadata`,
  its tables built on the CPU).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback
from typing import Any

FACTS = (
    "model_path", "tp_size", "dp_size", "attn_dp_size", "ep_size", "nnodes", "node_rank", "dist_init_addr",
    "smg_grpc_mode", "disaggregation_mode", "disaggregation_transfer_backend",
    "disaggregation_bootstrap_port",
    "load_balance_method", "moe_a2a_backend", "deepep_mode", "enable_metrics", "kv_events_config",
    "dist_timeout", "ep_num_redundant_experts", "init_expert_location", "enable_eplb", "page_size", "host",
    "port",
)  # fmt: skip


def resolve(args: list[str]) -> Any:
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.server_args import prepare_server_args

    server_args = prepare_server_args(args)
    if server_args.tokenizer_path is None:  # as sglang.launch_server.run_server does
        server_args.tokenizer_path = server_args.model_path
    server_args.resolve_once()
    return server_args, resolved_view(server_args)


def facts(args: list[str]) -> dict[str, Any]:
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # argparse says what it rejects there, then exits
            _, view = resolve(args)
    except BaseException as e:
        return {"error": f"{type(e).__name__}: {e} {said.getvalue()[-600:]}".strip()}
    out = {}
    for name in FACTS:
        value = getattr(view, name, None)
        out[name] = value if isinstance(value, int | float | str | bool | type(None)) else str(value)
    return out


def expert_location(args: list[str]) -> dict[str, Any]:
    try:
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.eplb.expert_location import compute_initial_expert_location_metadata
        from sglang.srt.runtime_context import publish

        # The loader builds its tables on the device: here, the CPU.
        server_args, _ = resolve([a for a in args if not a.startswith("--device")] + ["--device=cpu"])
        publish(server_args, role="scheduler")
        meta = compute_initial_expert_location_metadata(
            ModelConfig.from_server_args(server_args), moe_ep_rank=0
        )
        return {
            "physical_to_logical_map": list(meta.physical_to_logical_map.shape),
            "num_local_physical_experts": meta.num_local_physical_experts,
            "first_row": meta.physical_to_logical_map[-1].tolist(),
        }
    except BaseException as e:
        return {"error": f"{type(e).__name__}: {e}", "where": traceback.format_exc().splitlines()[-3:]}


def main() -> None:
    from tests.doubles.sglang_cpu import stubs

    stubs.install()
    request = json.load(sys.stdin)
    answer = {
        "commands": [facts(a) for a in request.get("commands", [])],
        "expert_location": [expert_location(a) for a in request.get("expert_location", [])],
    }
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
