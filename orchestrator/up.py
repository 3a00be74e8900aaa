"""`moeserve up`: the embedded cluster on this machine.

Starts the orchestrator with the `local` membership backend, which runs `--prefill` prefill and
`--decode` decode instances (EP groups of `--prefill-ep` / `--decode-ep` ranks) as its own
children on loopback, with the tiny DeepSeek-V3-shaped model built on first use (or `--model
DIR`). The pools resize through the admin API (`moeserve pools ...`, loopback only without an
admin token), and a failed instance is replaced without touching the others. SIGINT or SIGTERM
stops everything in order: the orchestrator stops admitting and ends every stream with a final
event, then stops its instances (each EP group together). Children run in sessions of their
own, so a terminal's Ctrl-C reaches only this process, which orders the stop; they also die
with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from secrets import token_hex
from typing import Annotated

import grpc
import typer
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

from orchestrator.config import env_keys, read_keys
from orchestrator.dispatch.policies import DEFAULT as DEFAULT_POLICY
from services.common import wire
from services.common.logs import setup_logging
from services.common.process import port_in_use, spawn_env, stop_on_signals
from services.common.typer_main import (
    LogFormat,
    LogFormatOption,
    LogLevel,
    LogLevelOption,
    LogRequestsOption,
    ModelArch,
    namespace,
    run_app,
)

ORCHESTRATOR_STOP_S = 2.0
WORKER_STOP_S = 4.0
UP_STOP_S = ORCHESTRATOR_STOP_S + WORKER_STOP_S
"""`moeserve up` gives its orchestrator this long: it stops its own instances before it exits."""


class Cluster:
    """Child processes started in order and stopped in reverse order."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None, output: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a child; `env` adds variables (secrets go there, never on a command line); `output`
        takes its stdout and stderr (default: this process's)."""
        env = spawn_env({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})})
        with contextlib.ExitStack() as files:
            sink = files.enter_context(output.open("ab")) if output is not None else None
            proc = subprocess.Popen(
                [sys.executable, *args], env=env, start_new_session=True, stdout=sink, stderr=sink
            )
        self.children.append((name, proc))
        return proc

    def dead(self) -> str | None:
        for name, proc in self.children:
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def stop(self) -> None:
        """Stop the children newest first (the orchestrator before the workers it calls)."""
        started = [proc for _, proc in self.children]
        orchestrators = [p for name, p in self.children if name == "orchestrator"]
        for group, grace in ((orchestrators, UP_STOP_S), (started, WORKER_STOP_S)):
            for proc in reversed(group):
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + grace
            for proc in group:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def wait_worker(cluster: Cluster, address: str, timeout: float, token: str | None = None) -> None:
    """Until the worker at `address` answers HealthCheck healthy (sending `token`, default this
    process's gRPC token)."""
    stub = pb_grpc.SglangSchedulerStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (why := cluster.dead()) is not None:
            raise RuntimeError(why)
        try:
            if stub.HealthCheck(
                pb.HealthCheckRequest(), timeout=1.0, metadata=wire.auth_metadata(token)
            ).healthy:
                return
        except grpc.RpcError:
            time.sleep(0.3)
    raise RuntimeError(f"worker {address} not healthy after {timeout:.0f}s")


def wait_http(cluster: Cluster, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (why := cluster.dead()) is not None:
            raise RuntimeError(why)
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s")


def tiny_model(arch: str) -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "services.tools.cli", "tiny-model-path", "--arch", arch],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"could not build the tiny model: {out.stderr.strip()}")
    return Path(out.stdout.strip().splitlines()[-1])


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(
    help="The embedded cluster: the orchestrator and its prefill and decode instances on this machine."
)
def up(
    ctx: typer.Context,
    model: Annotated[
        Path | None, typer.Option(help="model directory (default: the tiny DeepSeek-V3-shaped model)")
    ] = None,
    arch: Annotated[
        ModelArch, typer.Option(help="the tiny model's family when --model is not given")
    ] = ModelArch.deepseek_v3,
    trust_remote_code: Annotated[
        bool, typer.Option(help="load a tokenizer that is Python code in the model directory (Kimi K2's)")
    ] = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[
        list[str] | None,
        typer.Option(help="accepted bearer key (repeatable; better MOESERVE_API_KEYS or --api-key-file)"),
    ] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="file of accepted keys, one per line")] = None,
    admin_token: Annotated[
        str,
        typer.Option(envvar="MOESERVE_ADMIN_TOKEN", help="bearer token of /admin/* (default: loopback only)"),
    ] = "",
    prefill: Annotated[int, typer.Option(help="prefill instances")] = 1,
    decode: Annotated[int, typer.Option(help="decode instances")] = 1,
    prefill_ep: Annotated[int, typer.Option(help="expert-parallel ranks per prefill instance")] = 2,
    decode_ep: Annotated[int, typer.Option(help="expert-parallel ranks per decode instance")] = 2,
    ready_timeout: float = 180.0,
    prefill_policy: Annotated[
        str, typer.Option(help="how prefill instances are picked: prefix_affinity or least_load")
    ] = DEFAULT_POLICY,
    worker_arg: Annotated[
        list[str] | None,
        typer.Option(help="an argument for every worker, e.g. --worker-arg=--no-prefix-cache"),
    ] = None,
    autoscale: Annotated[
        str, typer.Option(help="size the pools from live load: 'on' or KEY=VALUE,... (see moeserve serve)")
    ] = "",
    log_level: LogLevelOption = LogLevel.info,
    log_format: LogFormatOption = LogFormat.text,
    log_requests: LogRequestsOption = False,
) -> None:
    a = namespace(ctx.params)
    a.api_key = api_key or []
    raise typer.Exit(run(a))


def main(argv: list[str] | None = None) -> int:
    """`moeserve up ...` / `python -m orchestrator.up ...`: parse, then run."""
    return run_app(app, argv, "moeserve up")


def run(a: argparse.Namespace) -> int:
    if port_in_use(a.host, a.port):
        print(f"moeserve up: {a.host}:{a.port} is in use; stop what holds it or pass --port", file=sys.stderr)
        return 2
    setup_logging(a.log_level, a.log_format, a.log_requests)  # the children read it from the environment
    stop = stop_on_signals()
    cluster = Cluster()
    try:
        model = a.model or tiny_model(a.arch)
        serve = ["-m", "orchestrator.serve", "--model", str(model), "--host", a.host, "--port", str(a.port)]
        serve += ["--membership", "local", "--prefill-instances", str(a.prefill)]
        serve += ["--decode-instances", str(a.decode), "--prefill-ep", str(a.prefill_ep)]
        serve += ["--decode-ep", str(a.decode_ep), "--prefill-policy", a.prefill_policy]
        serve += [f"--worker-arg={arg}" for arg in a.worker_arg or ()]
        serve += ["--autoscale", a.autoscale] if a.autoscale else []
        serve += ["--trust-remote-code"] if a.trust_remote_code else []
        # Secrets go to the orchestrator through its environment: a command line shows in `ps`.
        keys = [*a.api_key, *read_keys(a.api_key_file), *env_keys()]
        secrets = {"MOESERVE_API_KEYS": ",".join(keys), "MOESERVE_ADMIN_TOKEN": a.admin_token}
        # The workers' gRPC takes no API key: one token of this cluster's own (or the caller's)
        # guards it; the orchestrator gives it to the workers it starts.
        secrets[wire.TOKEN_ENV] = wire.grpc_token() or token_hex(16)
        cluster.spawn("orchestrator", serve, env=secrets)
        wait_http(cluster, f"http://{a.host}:{a.port}/ready", a.ready_timeout)
        print(
            f"moeserve is up: OpenAI API at http://{a.host}:{a.port}/v1 serving model {model.name!r} "
            f"({a.prefill} prefill instance(s) of EP{a.prefill_ep}, {a.decode} decode instance(s) of "
            f"EP{a.decode_ep}; `moeserve pools status` shows them); Ctrl-C stops it",
            flush=True,
        )
        while not stop.wait(0.5):
            if (why := cluster.dead()) is not None:
                print(f"moeserve up: {why}; stopping", file=sys.stderr)
                return 1
        return 0
    except (RuntimeError, ValueError) as e:
        print(f"moeserve up: {e}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
