"""`moeserve serve --prefill ADDR... --decode ADDR... --model DIR`: the orchestrator's HTTP server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from orchestrator.api import ApiConfig, create_app
from orchestrator.tokenizer import TokenizerError
from orchestrator.workers import WorkerPool


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moeserve serve", description="OpenAI-compatible orchestrator")
    ap.add_argument("--prefill", nargs="+", required=True, metavar="HOST:PORT", help="prefill workers")
    ap.add_argument("--decode", nargs="+", required=True, metavar="HOST:PORT", help="decode workers")
    ap.add_argument("--model", required=True, type=Path, help="model directory (tokenizer, chat template)")
    ap.add_argument("--served-model-name", default="")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accepted bearer key (repeatable); also MOESERVE_API_KEYS=k1,k2",
    )
    ap.add_argument("--max-concurrency", type=int, default=256)
    return ap


def config_from_args(a: argparse.Namespace) -> ApiConfig:
    keys = set(a.api_key) | {k for k in os.environ.get("MOESERVE_API_KEYS", "").split(",") if k}
    return ApiConfig(a.model, a.served_model_name, frozenset(keys), a.max_concurrency)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    a = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("MOESERVE_LOG_LEVEL", "WARNING"))
    config = config_from_args(a)
    if not config.api_keys:
        print(
            "moeserve serve: no API key configured; the API is open to anyone who can reach it",
            file=sys.stderr,
        )
    try:
        app = create_app(config, WorkerPool(a.prefill, a.decode))
    except TokenizerError as e:
        print(f"moeserve serve: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
