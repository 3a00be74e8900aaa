"""`python -m services.worker --role prefill|decode --model DIR [...]` (also `moeserve worker`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer

from services.common.logs import setup_logging
from services.common.process import die_with_parent_if_asked
from services.common.roles import Role
from services.common.typer_main import (
    LogFormat,
    LogFormatOption,
    LogLevel,
    LogLevelOption,
    LogRequestsOption,
    namespace,
    run_app,
)
from services.engine.config import EngineConfig, EngineConfigError
from services.models.quant import Fp8Mode
from services.worker.config import DeepEPMode, DispatcherBackend, KVPush, TransferProtocol, WorkerConfig

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
Opt = typer.Option


@app.command(help="A worker instance: SGLang's scheduler gRPC, the KV hand-off, an EP group of --ep ranks.")
def worker(
    role: Annotated[Role, Opt(help="prefill computes prompts and hands KV off; decode generates")],
    model: Annotated[Path, Opt(help="Hugging Face style model directory")],
    host: Annotated[str, Opt(help="address this node binds and peers reach it at")] = "127.0.0.1",
    advertise_host: Annotated[str, Opt(help="address peers reach this node at (default: --host)")] = "",
    port: int = 30001,
    served_model_name: str = "",
    transfer_protocol: TransferProtocol = "tcp",
    transfer_device: Annotated[str, Opt(help="RDMA device(s) for Mooncake, e.g. mlx5_0")] = "",
    kv_push: Annotated[
        KVPush, Opt(help="prefill: write KV per layer during compute, or all after")
    ] = "layerwise",
    ep: Annotated[int, Opt(help="expert-parallel ranks in this instance (processes)")] = 1,
    ep_slots: Annotated[int, Opt(help="physical expert slots over the group (default: one per expert)")] = 0,
    eplb_interval: Annotated[
        float, Opt(help="seconds between re-plans of the expert placement from the load window (0: off)")
    ] = 0.0,
    eplb_tolerance: Annotated[
        float, Opt(help="balancedness a re-plan may give up to move fewer slots")
    ] = 0.01,
    ep_placement: Annotated[
        str, Opt(help="placement file from `moeserve eplb plan` (which expert each slot holds)")
    ] = "",
    dispatcher: Annotated[DispatcherBackend, Opt(help="EP token exchange backend")] = "torch",
    deepep_mode: Annotated[DeepEPMode, Opt(help="deepep: auto = decode expanded, no host syncs")] = "auto",
    nnodes: Annotated[int, Opt(help="nodes the instance spans (--ep ranks split evenly)")] = 1,
    node_rank: Annotated[int, Opt(help="this node's index; node 0 serves --port")] = 0,
    dist_init_addr: Annotated[str, Opt(help="HOST:PORT of node 0 where the group meets")] = "",
    dist_timeout: Annotated[float, Opt(help="seconds to wait for every node to join")] = 60.0,
    handoff_timeout: Annotated[float, Opt(help="seconds to wait for a room's peer")] = 30.0,
    prefill_timeout: Annotated[float, Opt(help="seconds decode waits for prompt KV")] = 300.0,
    dtype: Annotated[
        str | None, Opt(help="float32|bfloat16|float16 (default: bfloat16 on CUDA, else float32)")
    ] = None,
    device: Annotated[str, Opt(help="auto: cuda when this node has a GPU, else cpu; or cpu, cuda")] = "auto",
    fp8: Annotated[Fp8Mode, Opt(help="FP8 checkpoints: keep in FP8, dequantize at load, or auto")] = "auto",
    page_size: int = 16,
    kv_pool_tokens: int | None = None,
    max_num_seqs: int = 64,
    max_prefill_tokens: int = 512,
    max_model_len: int | None = None,
    prefix_cache: Annotated[
        bool, Opt(help="prefill: reuse the KV of cached prompt prefixes (decode receives its KV, no cache)")
    ] = True,
    threads: Annotated[int, Opt(help="torch threads in this process")] = 1,
    metrics_port: Annotated[int, Opt(help="serve Prometheus /metrics on --host:PORT (0: off)")] = 0,
    log_level: LogLevelOption = LogLevel.info,
    log_format: LogFormatOption = LogFormat.text,
    log_requests: LogRequestsOption = False,
) -> None:
    params = dict(locals())
    a = namespace(params)
    raise typer.Exit(run(a))


def build_config(a: argparse.Namespace) -> WorkerConfig:
    device = a.device if a.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    engine = EngineConfig(
        dtype=a.dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
        device=device,
        fp8=a.fp8,
        page_size=a.page_size,
        kv_pool_tokens=a.kv_pool_tokens,
        max_num_seqs=a.max_num_seqs,
        max_prefill_tokens=a.max_prefill_tokens,
        max_model_len=a.max_model_len,
        prefix_cache=a.prefix_cache and a.role == "prefill",
        num_threads=a.threads,
    )
    return WorkerConfig(
        role=a.role,
        model=a.model,
        host=a.host,
        port=a.port,
        served_model_name=a.served_model_name,
        transfer_protocol=a.transfer_protocol,
        transfer_device=a.transfer_device,
        kv_push=a.kv_push,
        ep_size=a.ep,
        nnodes=a.nnodes,
        node_rank=a.node_rank,
        dist_init_addr=a.dist_init_addr,
        dist_timeout_s=a.dist_timeout,
        advertise_host=a.advertise_host,
        ep_slots=a.ep_slots,
        ep_placement=a.ep_placement,
        eplb_interval_s=a.eplb_interval,
        eplb_tolerance=a.eplb_tolerance,
        dispatcher=a.dispatcher,
        deepep_mode=a.deepep_mode,
        handoff_timeout_s=a.handoff_timeout,
        prefill_timeout_s=a.prefill_timeout,
        metrics_port=a.metrics_port,
        engine=engine,
    )


def main(argv: list[str] | None = None) -> int:
    """`moeserve worker ...` / `python -m services.worker ...`: parse, then run."""
    return run_app(app, argv, "moeserve worker")


def run(a: argparse.Namespace) -> int:
    die_with_parent_if_asked()
    setup_logging(a.log_level, a.log_format, a.log_requests)
    try:
        config = build_config(a)
    except (EngineConfigError, ValueError) as e:
        print(f"moeserve worker: {e}", file=sys.stderr)
        return 2
    from services.worker.supervisor import serve  # heavy imports after argument errors are reported

    try:
        return serve(config)
    except (ValueError, OSError) as e:
        print(f"moeserve worker: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The instance has stopped in order; threads of finished calls may linger in their pools.
    os._exit(code)
