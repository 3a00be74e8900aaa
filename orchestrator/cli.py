"""The `moeserve` command.

Worker-side subcommands (which need torch) run in their own interpreter through
`python -m services.cli`, so this package stays free of engine imports.
"""

from __future__ import annotations

import os
import sys

WORKER_COMMANDS = {"make-tiny-model", "generate"}

USAGE = """usage: moeserve COMMAND [ARGS]

commands:
  make-tiny-model DIR --arch deepseek_v3|qwen3_moe   write a tiny random checkpoint with a tokenizer
  generate [--model DIR] --prompt TEXT                offline generation with the reference engine
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args[0] in WORKER_COMMANDS:
        # exec, not import: the engine's dependencies stay out of the orchestrator's process.
        os.execv(sys.executable, [sys.executable, "-m", "services.cli", *args])
    print(f"moeserve: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
