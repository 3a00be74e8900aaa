"""`moeserve serve --prefill ADDR... --decode ADDR... --model DIR`: the orchestrator's HTTP server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
import uvicorn

from orchestrator.config import ApiConfig, env_keys, read_keys
from orchestrator.dispatch.policies import DEFAULT as DEFAULT_POLICY
from orchestrator.dispatch.policies import create as create_policy
from orchestrator.fleet.autoscaler import Autoscaler, AutoscalerConfig
from orchestrator.fleet.membership import create as create_membership
from orchestrator.fleet.registry import Registry
from orchestrator.http.app import create_app
from orchestrator.http.tokenizer import TokenizerError
from services.common.logs import setup_logging
from services.common.process import die_with_parent_if_asked, loopback_only
from services.common.typer_main import (
    LogFormat,
    LogFormatOption,
    LogLevel,
    LogLevelOption,
    LogRequestsOption,
    namespace,
    run_app,
)

GRACE_S = 2
"""After a stop signal, how long connections may take to finish before uvicorn cancels them (the
app's streams end at once; this only bounds a client that stops reading)."""


class MembershipChoice(StrEnum):
    static = "static"
    local = "local"
    kubernetes = "kubernetes"


VARIADIC = ("--prefill", "--decode")
"""Address lists as SMG takes them (`--prefill grpc://HOST:PORT BOOTSTRAP_PORT HOST:PORT ...`):
click has no variadic options, so they are taken from the command's extra arguments."""


def take_variadic(args: list[str]) -> dict[str, list[str]]:
    """{"--prefill": [...], "--decode": [...]} from the extra arguments; anything else is an error."""
    out: dict[str, list[str]] = {flag: [] for flag in VARIADIC}
    current: str | None = None
    for arg in args:
        if arg in VARIADIC:
            current = arg
        elif arg.startswith("-") or current is None:
            raise typer.BadParameter(f"no such option or value: {arg}")
        else:
            out[current].append(arg)
    return out


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
VARIADIC_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(
    context_settings=VARIADIC_CONTEXT,
    help="The OpenAI-compatible orchestrator. Static pools: --prefill ADDR [ADDR ...] --decode ADDR "
    "[ADDR ...], each HOST:PORT or grpc://HOST:PORT [BOOTSTRAP_PORT] (SGLang prefill workers).",
)
def serve(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option(help="model directory (tokenizer, chat template)")],
    membership: Annotated[
        MembershipChoice,
        typer.Option(help="static: the --prefill/--decode addresses; local: run instances here; kubernetes"),
    ] = MembershipChoice.static,
    prefill_instances: Annotated[int, typer.Option(help="local: prefill instances to run")] = 1,
    decode_instances: Annotated[int, typer.Option(help="local: decode instances to run")] = 1,
    prefill_ep: Annotated[int, typer.Option(help="local: EP ranks per prefill instance")] = 1,
    decode_ep: Annotated[int, typer.Option(help="local: EP ranks per decode instance")] = 1,
    worker_arg: Annotated[
        list[str] | None,
        typer.Option(help="local: an argument for every worker, e.g. --worker-arg=--no-prefix-cache"),
    ] = None,
    k8s_release: Annotated[
        str, typer.Option(help="kubernetes: the Helm release (LWS {release}-{role})")
    ] = "moeserve",
    k8s_namespace: Annotated[
        str, typer.Option(envvar="POD_NAMESPACE", help="kubernetes: namespace")
    ] = "default",
    worker_port: Annotated[int, typer.Option(help="kubernetes: the workers' gRPC port")] = 30001,
    prefill_worker_port: Annotated[
        int | None, typer.Option(help="kubernetes: the prefill workers' gRPC port (default --worker-port)")
    ] = None,
    decode_worker_port: Annotated[
        int | None, typer.Option(help="kubernetes: the decode workers' gRPC port (default --worker-port)")
    ] = None,
    k8s_ready_timeout: Annotated[
        float, typer.Option(help="kubernetes: seconds a group may take to turn healthy before it is failed")
    ] = 1800.0,
    k8s_watch_stale: Annotated[
        float,
        typer.Option(help="kubernetes: seconds of a failing pod watch before /ready says 503 (0: never)"),
    ] = 120.0,
    bootstrap_port: Annotated[
        int | None, typer.Option(help="kubernetes: SGLang prefill bootstrap port")
    ] = None,
    admin_token: Annotated[
        str,
        typer.Option(
            envvar="MOESERVE_ADMIN_TOKEN", help="bearer token of /admin/*; without it, loopback only"
        ),
    ] = "",
    served_model_name: str = "",
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            help="load a tokenizer that is Python code in the model directory (Kimi K2's); it runs here"
        ),
    ] = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[
        list[str] | None, typer.Option(help="accepted bearer key (repeatable); also MOESERVE_API_KEYS=k1,k2")
    ] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="file of accepted keys, one per line")] = None,
    max_concurrency: int = 256,
    max_queue: Annotated[
        int, typer.Option(help="requests that may wait for a place beyond max-concurrency")
    ] = 64,
    queue_timeout: Annotated[float, typer.Option(help="seconds a request may wait before a 429")] = 10.0,
    key_token_rate: Annotated[
        float, typer.Option(help="tokens/s each API key may use, prompt + generated (0: no limit)")
    ] = 0.0,
    key_token_burst: Annotated[
        float, typer.Option(help="most tokens a key may use at once (default: 60 s of its rate)")
    ] = 0.0,
    breaker_threshold: Annotated[
        int, typer.Option(help="failed requests in a row that stop an instance's traffic")
    ] = 3,
    breaker_cooldown: Annotated[
        float, typer.Option(help="seconds before a stopped instance gets a probe")
    ] = 5.0,
    prefill_policy: Annotated[
        str, typer.Option(help="how prefill instances are picked: prefix_affinity or least_load")
    ] = DEFAULT_POLICY,
    policy_option: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=VALUE parameter of the prefill policy (repeatable; see orchestrator/dispatch/policies)"
        ),
    ] = None,
    dispatch: Annotated[
        str,
        typer.Option(
            help="auto: one stream per request, decode forwards it to prefill, where both workers serve "
            "that (moeserve's do); dual: the request to both workers (SGLang's dispatch, as SMG does)"
        ),
    ] = "auto",
    autoscale: Annotated[
        str,
        typer.Option(
            help="set the pools' sizes from live load: 'on', or KEY=VALUE,... (min, max, utilization, "
            "down-utilization, down-delay, cold-start, interval, window, ttft-ms, itl-ms; model, gpu, "
            "decode-ep to size decode groups by the cost model); off by default"
        ),
    ] = "",
    log_level: LogLevelOption = LogLevel.info,
    log_format: LogFormatOption = LogFormat.text,
    log_requests: LogRequestsOption = False,
) -> None:
    addresses = take_variadic(ctx.args)
    options = namespace(ctx.params)
    options.prefill, options.decode = addresses["--prefill"], addresses["--decode"]
    options.api_key = api_key or []
    raise typer.Exit(run(options))


def config_from_args(a: argparse.Namespace) -> ApiConfig:
    keys = set(a.api_key) | set(read_keys(a.api_key_file)) | set(env_keys())
    return ApiConfig(
        a.model,
        a.served_model_name,
        frozenset(keys),
        a.max_concurrency,
        max_queue=a.max_queue,
        queue_timeout_s=a.queue_timeout,
        key_token_rate=a.key_token_rate,
        key_token_burst=a.key_token_burst,
        admin_token=a.admin_token,
        public=not loopback_only(a.host),
        dispatch=a.dispatch,
        trust_remote_code=a.trust_remote_code,
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

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None:  # a signal handler: hand the stop to the event loop
            self._loop.call_soon_threadsafe(self._on_stop)


def main(argv: list[str] | None = None) -> int:
    """`moeserve serve ...` / `python -m orchestrator.serve ...`: parse, then run."""
    return run_app(app, argv, "moeserve serve")


def run(a: argparse.Namespace) -> int:
    die_with_parent_if_asked()
    setup_logging(a.log_level, a.log_format, a.log_requests)
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
        registry = Registry(a.breaker_threshold, a.breaker_cooldown)
        if a.membership == "static":
            if not a.prefill or not a.decode:
                raise ValueError("--membership static needs --prefill ADDR... and --decode ADDR...")
            options = dict(prefill=a.prefill, decode=a.decode)
        elif a.membership == "kubernetes":
            options = dict(
                release=a.k8s_release,
                namespace=a.k8s_namespace,
                port={
                    "prefill": a.prefill_worker_port or a.worker_port,
                    "decode": a.decode_worker_port or a.worker_port,
                },
                bootstrap_port=a.bootstrap_port,
                ready_timeout_s=a.k8s_ready_timeout,
                stale_after_s=a.k8s_watch_stale,
            )
        else:
            options = dict(
                model=a.model,
                prefill=a.prefill_instances,
                decode=a.decode_instances,
                prefill_ep=a.prefill_ep,
                decode_ep=a.decode_ep,
                worker_args=tuple(a.worker_arg or ()),
            )
        membership = create_membership(a.membership, registry, **options)
        pairs = [opt.partition("=") for opt in a.policy_option or []]
        if any(not sep for _, sep, _ in pairs):
            raise ValueError("--policy-option takes KEY=VALUE")
        policy = create_policy(a.prefill_policy, {k: v for k, _, v in pairs})
        autoscaler = None
        if a.autoscale:
            scaling = AutoscalerConfig.parse(a.autoscale)
            membership.check_scale("decode", max(1, scaling.min))  # a backend that cannot scale says so now
            autoscaler = Autoscaler(scaling, registry, membership)
        app = create_app(config, registry, membership, policy, autoscaler)
    except (TokenizerError, ValueError) as e:
        print(f"moeserve serve: {e}", file=sys.stderr)
        return 2
    server_config = uvicorn.Config(
        app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=GRACE_S, log_config=None
    )
    server = _Server(server_config, on_stop=app.state.admission.close)
    # Once stopped, uvicorn re-raises the signal it caught: SIGTERM ends the process with that
    # status, SIGINT comes back as KeyboardInterrupt.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
