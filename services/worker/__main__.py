"""`python -m services.worker --role prefill|decode --model DIR [...]` (also `moeserve worker`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from services.engine.config import EngineConfig, EngineConfigError
from services.process import die_with_parent_if_asked
from services.worker.config import WorkerConfig


def parse(argv: list[str] | None = None) -> WorkerConfig:
    ap = argparse.ArgumentParser(prog="moeserve worker", description=__doc__)
    ap.add_argument("--role", required=True, choices=["prefill", "decode"])
    ap.add_argument("--model", required=True, type=Path, help="Hugging Face style model directory")
    ap.add_argument("--host", default="127.0.0.1", help="address this node binds and peers reach it at")
    ap.add_argument("--advertise-host", default="", help="address peers reach this node at (default: --host)")
    ap.add_argument("--port", type=int, default=30001)
    ap.add_argument("--served-model-name", default="")
    ap.add_argument("--transfer-protocol", choices=["tcp", "rdma"], default="tcp")
    ap.add_argument("--transfer-device", default="", help="RDMA device(s) for Mooncake, e.g. mlx5_0")
    ap.add_argument(
        "--kv-push",
        choices=["layerwise", "complete"],
        default="layerwise",
        help="prefill: write KV per layer during compute, or all after the prompt",
    )
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel ranks in this instance (processes)")
    ap.add_argument(
        "--ep-slots",
        type=int,
        default=0,
        help="physical expert slots over the group (default: one per expert; more = replicas)",
    )
    ap.add_argument(
        "--dispatcher", choices=["torch", "deepep"], default="torch", help="EP token exchange backend"
    )
    ap.add_argument(
        "--deepep-mode",
        choices=["auto", "normal"],
        default="auto",
        help="deepep: auto = decode in the expanded layout without host syncs; normal = normal mode always",
    )
    ap.add_argument(
        "--nnodes", type=int, default=1, help="nodes the instance spans (--ep ranks split evenly)"
    )
    ap.add_argument("--node-rank", type=int, default=0, help="this node's index; node 0 serves --port")
    ap.add_argument("--dist-init-addr", default="", help="HOST:PORT of node 0 where the group meets")
    ap.add_argument("--dist-timeout", type=float, default=60.0, help="seconds to wait for every node to join")
    ap.add_argument("--handoff-timeout", type=float, default=30.0, help="seconds to wait for a room's peer")
    ap.add_argument("--prefill-timeout", type=float, default=300.0, help="seconds decode waits for prompt KV")
    ap.add_argument(
        "--dtype", default=None, help="float32|bfloat16|float16 (default: bfloat16 on CUDA, else float32)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--fp8",
        choices=["auto", "keep", "dequantize"],
        default="auto",
        help="FP8 checkpoints: keep weights in FP8 (block-scaled GEMMs), dequantize at load, or auto "
        "(keep where the device has a native FP8 GEMM)",
    )
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--kv-pool-tokens", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-prefill-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    a = ap.parse_args(argv)
    engine = EngineConfig(
        dtype=a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"),
        device=a.device,
        fp8=a.fp8,
        page_size=a.page_size,
        kv_pool_tokens=a.kv_pool_tokens,
        max_num_seqs=a.max_num_seqs,
        max_prefill_tokens=a.max_prefill_tokens,
        max_model_len=a.max_model_len,
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
        dispatcher=a.dispatcher,
        deepep_mode=a.deepep_mode,
        handoff_timeout_s=a.handoff_timeout,
        prefill_timeout_s=a.prefill_timeout,
        engine=engine,
    )


def main(argv: list[str] | None = None) -> int:
    die_with_parent_if_asked()
    logging.basicConfig(level=os.environ.get("MOESERVE_LOG_LEVEL", "WARNING"))
    try:
        config = parse(argv)
    except (EngineConfigError, ValueError) as e:
        print(f"moeserve worker: {e}", file=sys.stderr)
        return 2
    from services.worker.instance import serve  # heavy imports after argument errors are reported

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
