"""The `moeserve` command (typer + rich).

Worker-side commands (which need torch) run in their own interpreter (`python -m services...`),
so this package stays free of engine imports; they, `up` and `serve` take their own options
(`moeserve COMMAND --help` shows them). `pools` talks to a running orchestrator's admin API.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import typer

from orchestrator import pools_cli
from orchestrator.planner.cli import plan_command
from services.common.typer_main import run_app

app = typer.Typer(
    name="moeserve",
    help="Disaggregated, expert-parallel serving of mixture-of-experts models.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(pools_cli.app, name="pools")
app.command(
    "plan", help="capacity plan: EP width and groups per role, latency and cost, for a traffic profile"
)(plan_command)

PASS_THROUGH: dict[str, Any] = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
    "add_help_option": False,  # --help reaches the command's own parser
}
WORKER_COMMANDS = {
    "make-tiny-model": ("services.tools.cli", "write a tiny random checkpoint with a tokenizer"),
    "generate": ("services.tools.cli", "offline generation with the reference engine"),
    "inspect-model": (
        "services.tools.cli",
        "parameters, and the bytes one rank of EP W holds (from config.json)",
    ),
    "worker": ("services.worker", "a worker instance (SGLang scheduler gRPC + KV hand-off)"),
    "eplb": ("services.eplb", "expert placement: dump an instance's loads, plan a placement from them"),
}


def _exec_worker_command(command: str, module: str) -> Callable[[typer.Context], None]:
    def run(ctx: typer.Context) -> None:
        argv = [command, *ctx.args] if module == "services.tools.cli" else list(ctx.args)
        # exec, not import: the engine's dependencies stay out of the orchestrator's process.
        os.execv(sys.executable, [sys.executable, "-m", module, *argv])

    return run


for _name, (_module, _help) in WORKER_COMMANDS.items():
    app.command(_name, help=_help, **PASS_THROUGH)(_exec_worker_command(_name, _module))


@app.command(
    "up", help="the embedded cluster: orchestrator + prefill and decode pools on this machine", **PASS_THROUGH
)
def up(ctx: typer.Context) -> None:
    from orchestrator.up import main as up_main

    raise typer.Exit(up_main(list(ctx.args)))


@app.command("serve", help="the OpenAI-compatible orchestrator", **PASS_THROUGH)
def serve(ctx: typer.Context) -> None:
    from orchestrator.serve import main as serve_main

    raise typer.Exit(serve_main(list(ctx.args)))


def main(argv: list[str] | None = None) -> int:
    return run_app(app, argv, "moeserve")


if __name__ == "__main__":
    sys.exit(main())
