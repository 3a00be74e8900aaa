"""KV hand-off: throughput against a raw Mooncake transfer, and TTFT disaggregated vs monolithic.

    OMP_NUM_THREADS=1 .venv/bin/python bench/handoff.py [--lengths 128 512 1024 2048 4096]

Runs a real prefill worker and decode worker (Mooncake TCP on loopback) on a small
DeepSeek-V3-shaped model whose KV entry has DeepSeek-V3's real size (kv_lora_rank 512 + rope 64
per layer, 8 layers, fp32: 18 KiB per token).

- Hand-off GB/s: KV bytes the prefill wrote into the decode pages / time spent in those writes
  (the worker's own counters), per prompt length.
- Raw GB/s: the same number of bytes in one Mooncake write between two bare transfer-engine
  processes on this host (same library, protocol and buffers as large).
- TTFT: first streamed token of a 1024-token prompt, disaggregated (both workers) vs monolithic
  (the decode worker computing the prompt itself), same processes, median of repeats.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator.up import Cluster, wait_worker
from services.common.process import free_port
from services.tools.tiny import make_tiny_model

BENCH_MODEL = dict(
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=64,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    max_position_embeddings=8192,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def raw_receiver(q_in, q_out, size):
    import torch

    from services.kv import TransferEngine

    te = TransferEngine()
    buf = torch.zeros(size, dtype=torch.uint8)
    te.register(buf.data_ptr(), buf.numel())
    q_out.put((te.session_id, buf.data_ptr()))
    q_in.get()


def raw_sender(q_in, q_out, size, lengths, repeats, target, dst):
    import torch

    from services.kv import TransferEngine

    te = TransferEngine()
    src = torch.ones(size, dtype=torch.uint8)
    te.register(src.data_ptr(), src.numel())
    res = {}
    for n in lengths:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            te.write(target, [src.data_ptr()], [dst], [n])
            best = min(best, time.perf_counter() - t)
        res[n] = n / best / 1e9
    q_out.put(res)


def raw_speeds(byte_counts: list[int], repeats: int) -> dict[int, float]:
    ctx = mp.get_context("spawn")
    size = max(byte_counts)
    to_recv, from_recv, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    recv = ctx.Process(target=raw_receiver, args=(to_recv, from_recv, size))
    recv.start()
    target, dst = from_recv.get(timeout=60)
    send = ctx.Process(target=raw_sender, args=(None, results, size, byte_counts, repeats, target, dst))
    send.start()
    out = results.get(timeout=300)
    send.join()
    to_recv.put(1)
    recv.join()
    return out


def request(prompt, room, prefill_addr, disagg=True, max_new=1):
    host, port = prefill_addr.rsplit(":", 1)
    req = pb.GenerateRequest(
        request_id=f"bench-{room}",
        tokenized=pb.TokenizedInput(input_ids=prompt),
        sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=True),
        stream=True,
    )
    if disagg:
        req.disaggregated_params.CopyFrom(
            pb.DisaggregatedParams(bootstrap_host=host, bootstrap_port=int(port), bootstrap_room=room)
        )
    return req


def first_token_time(stub_p, stub_d, req, disagg) -> float:
    start = time.perf_counter()
    if disagg:
        t = threading.Thread(target=lambda: list(stub_p.Generate(req, timeout=300)))
        t.start()
    stream = stub_d.Generate(req, timeout=300)
    next(stream)
    ttft = time.perf_counter() - start
    list(stream)
    if disagg:
        t.join()
    return ttft


def counters(stub) -> tuple[float, float]:
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).scheduler_info
    return info["kv_transfer_bytes"], info["kv_transfer_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    ap.add_argument("--ttft-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--kv-push", nargs="+", default=["layerwise", "complete"], choices=["layerwise", "complete"]
    )
    args = ap.parse_args()
    for push in args.kv_push:
        run(args, push)


def run(args: argparse.Namespace, push: str) -> None:
    cluster = Cluster()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(f"{tmp}/bench", "deepseek_v3", overrides=BENCH_MODEL)
        try:
            addrs = {}
            for role in ("prefill", "decode"):
                port = free_port()
                cluster.spawn(
                    role,
                    [
                        "-m",
                        "services.worker",
                        "--role",
                        role,
                        "--model",
                        str(model),
                        "--port",
                        str(port),
                        "--kv-pool-tokens",
                        "16384",
                        "--max-prefill-tokens",
                        "512",
                        "--kv-push",
                        push,
                    ],
                )
                addrs[role] = f"127.0.0.1:{port}"
            for a in addrs.values():
                wait_worker(cluster, a, 180)
            stub_p = pb_grpc.SglangSchedulerStub(grpc.insecure_channel(addrs["prefill"]))
            stub_d = pb_grpc.SglangSchedulerStub(grpc.insecure_channel(addrs["decode"]))
            room = 1
            handoff: dict[int, tuple[int, float]] = {}
            for n in args.lengths:
                prompt = [(7 * i) % 470 + 5 for i in range(n)]
                speeds, nbytes = [], 0
                for _ in range(args.repeats):
                    b0, s0 = counters(stub_p)
                    first_token_time(stub_p, stub_d, request(prompt, room, addrs["prefill"]), True)
                    room += 1
                    b1, s1 = counters(stub_p)
                    nbytes = int(b1 - b0)
                    speeds.append(nbytes / (s1 - s0) / 1e9)
                handoff[n] = (nbytes, max(speeds))
            raw = raw_speeds([b for b, _ in handoff.values()], args.repeats)

            prompt = [(11 * i) % 470 + 5 for i in range(args.ttft_len)]
            first_token_time(
                stub_p, stub_d, request(prompt, room, addrs["prefill"], disagg=False), False
            )  # warm
            mono, disagg = [], []
            for _ in range(args.repeats + 2):
                mono.append(
                    first_token_time(stub_p, stub_d, request(prompt, room, addrs["prefill"], False), False)
                )
                room += 1
                disagg.append(first_token_time(stub_p, stub_d, request(prompt, room, addrs["prefill"]), True))
                room += 1
        finally:
            cluster.stop()

    print(f"KV hand-off, --kv-push {push} (Mooncake tcp, loopback), 8 layers x 576 fp32 values per token")
    print(f"{'prompt tokens':>14}{'KV MB':>10}{'hand-off GB/s':>15}{'raw GB/s':>10}{'ratio':>8}")
    for n, (nbytes, speed) in handoff.items():
        r = raw[nbytes]
        print(f"{n:>14}{nbytes / 1e6:>10.1f}{speed:>15.2f}{r:>10.2f}{speed / r:>8.2f}")
    m, d = statistics.median(mono), statistics.median(disagg)
    print(
        f"TTFT, {args.ttft_len}-token prompt: monolithic {m * 1000:.1f} ms, disaggregated {d * 1000:.1f} ms, "
        f"ratio {d / m:.2f}"
    )


if __name__ == "__main__":
    main()
