"""`moeserve serve --prefill ADDR... --decode ADDR... --model DIR`: the orchestrator's HTTP server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from orchestrator.api import create_app
from orchestrator.config import ApiConfig
from orchestrator.membership import create as create_membership
from orchestrator.registry import Registry
from orchestrator.tokenizer import TokenizerError
from services.process import die_with_parent_if_asked

GRACE_S = 2
"""After a stop signal, how long connections may take to finish before uvicorn cancels them (the
app's streams end at once; this only bounds a client that stops reading)."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moeserve serve", description="OpenAI-compatible orchestrator")
    ap.add_argument(
        "--membership",
        choices=["static", "local", "kubernetes"],
        default="static",
        help="static: the --prefill/--decode addresses; local: run --prefill-instances/--decode-instances",
    )
    ap.add_argument(
        "--prefill",
        nargs="+",
        default=[],
        metavar="ADDR",
        help="static: prefill instances, HOST:PORT or grpc://HOST:PORT [BOOTSTRAP_PORT] (SGLang workers)",
    )
    ap.add_argument("--decode", nargs="+", default=[], metavar="ADDR", help="static: decode instances")
    ap.add_argument("--prefill-instances", type=int, default=1, help="local: prefill instances to run")
    ap.add_argument("--decode-instances", type=int, default=1, help="local: decode instances to run")
    ap.add_argument("--prefill-ep", type=int, default=1, help="local: EP ranks per prefill instance")
    ap.add_argument("--decode-ep", type=int, default=1, help="local: EP ranks per decode instance")
    ap.add_argument(
        "--k8s-release", default="moeserve", help="kubernetes: the Helm release (LWS {release}-{role})"
    )
    ap.add_argument("--k8s-namespace", default=os.environ.get("POD_NAMESPACE", "default"), help="kubernetes")
    ap.add_argument("--worker-port", type=int, default=30001, help="kubernetes: the workers' gRPC port")
    ap.add_argument(
        "--bootstrap-port", type=int, default=None, help="kubernetes: SGLang prefill bootstrap port"
    )
    ap.add_argument(
        "--admin-token",
        default=os.environ.get("MOESERVE_ADMIN_TOKEN", ""),
        help="bearer token of /admin/* (also MOESERVE_ADMIN_TOKEN); without it, loopback clients only",
    )
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
    return ApiConfig(
        a.model, a.served_model_name, frozenset(keys), a.max_concurrency, admin_token=a.admin_token
    )


class _Server(uvicorn.Server):
    """uvicorn's server, which also starts the app's orderly stop the moment SIGINT or SIGTERM arrives.

    Without it uvicorn would wait for running streams to end by themselves (up to its graceful
    timeout) and then cut them off; with it they end at once with a final event.
    """

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]):
        super().__init__(config)
        self._on_stop = on_stop
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None:  # a signal handler: hand the stop to the event loop
            self._loop.call_soon_threadsafe(self._on_stop)


def main(argv: list[str] | None = None) -> int:
    die_with_parent_if_asked()
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("MOESERVE_LOG_LEVEL", "WARNING"))
    try:
        config = config_from_args(a)
    except ValueError as e:
        print(f"moeserve serve: {e}", file=sys.stderr)
        return 2
    if not config.api_keys:
        print(
            "moeserve serve: no API key configured; the API is open to anyone who can reach it",
            file=sys.stderr,
        )
    try:
        registry = Registry()
        if a.membership == "static":
            if not a.prefill or not a.decode:
                raise ValueError("--membership static needs --prefill ADDR... and --decode ADDR...")
            options = dict(prefill=a.prefill, decode=a.decode)
        elif a.membership == "kubernetes":
            options = dict(
                release=a.k8s_release,
                namespace=a.k8s_namespace,
                port=a.worker_port,
                bootstrap_port=a.bootstrap_port,
            )
        else:
            options = dict(
                model=a.model,
                prefill=a.prefill_instances,
                decode=a.decode_instances,
                prefill_ep=a.prefill_ep,
                decode_ep=a.decode_ep,
            )
        membership = create_membership(a.membership, registry, **options)
        app = create_app(config, registry, membership)
    except (TokenizerError, ValueError) as e:
        print(f"moeserve serve: {e}", file=sys.stderr)
        return 2
    server_config = uvicorn.Config(
        app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=GRACE_S
    )
    server = _Server(server_config, on_stop=app.state.admission.close)
    # Once stopped, uvicorn re-raises the signal it caught: SIGTERM ends the process with that
    # status, SIGINT comes back as KeyboardInterrupt.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
