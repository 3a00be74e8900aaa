"""The `moeserve` command.

Worker-side subcommands (which need torch) run in their own interpreter (`python -m services...`),
so this package stays free of engine imports.
"""

from __future__ import annotations

import os
import sys

WORKER_COMMANDS = {
    "make-tiny-model": "services.cli",
    "generate": "services.cli",
    "inspect-model": "services.cli",
    "worker": "services.worker",
}

USAGE = """usage: moeserve COMMAND [ARGS]

commands:
  up                                   the embedded cluster: orchestrator + prefill + decode on this machine
  serve --prefill ADDR --decode ADDR --model DIR   the OpenAI-compatible orchestrator
  worker --role prefill|decode --model DIR         a worker (SGLang scheduler gRPC + KV hand-off)
  make-tiny-model DIR --arch deepseek_v3|qwen3_moe write a tiny random checkpoint with a tokenizer
  generate [--model DIR] --prompt TEXT              offline generation with the reference engine
  inspect-model DIR [--ep W] [--kv-tokens N] [--device-memory 80GiB] [--output json]
                                                   parameters, and the bytes one rank of EP W holds

`moeserve COMMAND --help` shows each command's options.
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command in WORKER_COMMANDS:
        module = WORKER_COMMANDS[command]
        argv_ = [command, *rest] if module == "services.cli" else rest
        # exec, not import: the engine's dependencies stay out of the orchestrator's process.
        os.execv(sys.executable, [sys.executable, "-m", module, *argv_])
    if command == "serve":
        from orchestrator.serve import main as serve

        return serve(rest)
    if command == "up":
        from orchestrator.up import main as up

        return up(rest)
    print(f"moeserve: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
