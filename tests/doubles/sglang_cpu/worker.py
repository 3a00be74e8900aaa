"""An SGLang gRPC worker on CPU: SGLang's real entry point and servicer, the fake scheduler behind.

    python -m tests.doubles.sglang_cpu.worker --record FILE [--step-ms MS] -- <sglang.launch_server args>

Runs `sglang.launch_server.run_server` on the given arguments, unchanged: SGLang's argument parser
and resolution, its gRPC entry (`--grpc-mode`: the HTTP sidecar on `--port`+1 with `/metrics`), and
smg-grpc-servicer's `serve_grpc` (request manager, scheduler and health servicers, the KV-events
default, SGLang's bootstrap server on a prefill). The one replacement is the scheduler launch:
`launch_scheduler_process_only` starts the fake scheduler ranks (`scheduler.py`) instead of GPU
processes. CUDA-only imports are stubbed (`stubs.py`).
"""

from __future__ import annotations

import argparse
import atexit
import json
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit("usage: worker --record FILE [--step-ms MS] -- <sglang.launch_server args>")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="tests.doubles.sglang_cpu.worker")
    parser.add_argument("--record", required=True, help="JSON-lines file the schedulers append to")
    parser.add_argument("--step-ms", type=float, default=10.0, help="one scheduler iteration")
    parser.add_argument("--kv-ms-per-token", type=float, default=0.0, help="a prefill's KV transfer time")
    parser.add_argument(
        "--health-s", type=float, default=0.0, help="how long a health check's generation takes"
    )
    ours = parser.parse_args(argv[:cut])

    from tests.doubles.sglang_cpu import stubs

    stubs.install()
    import smg_grpc_servicer.sglang.server as servicer_server
    from sglang.launch_server import run_server
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.server_args import PortArgs, prepare_server_args

    from tests.doubles.sglang_cpu.scheduler import Engine

    def launch(server_args: Any, port_args: Any = None) -> tuple[dict, Any, list]:
        port_args = port_args or PortArgs.init_new(server_args)
        config = json.loads((Path(server_args.model_path) / "config.json").read_text())
        context = ModelConfig.from_server_args(server_args).context_len
        engine = Engine(
            server_args, port_args, ours.record, ours.step_ms / 1000, config["vocab_size"], context,
            ours.kv_ms_per_token / 1000, ours.health_s,
        )  # fmt: skip
        engine.start()
        atexit.register(engine.close)
        return engine.info(), port_args, []  # no processes: the servicer waits for its signal

    servicer_server.launch_scheduler_process_only = launch
    run_server(prepare_server_args(argv[cut + 1 :]))


if __name__ == "__main__":
    main(sys.argv[1:])
