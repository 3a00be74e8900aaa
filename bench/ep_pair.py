"""EP2 instances end to end: TTFT, decode tok/s and gRPC calls per request, this tree vs another.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ep_pair.py [--baseline DIR] [--rounds 2]

Starts a prefill EP2 and a decode EP2 worker (tiny DeepSeek-V3-shaped model, Mooncake TCP on
loopback) and drives them over gRPC the way the orchestrator does: the same GenerateRequest to
both sides. `--baseline DIR` runs the same measurements on the worker code of another checkout
(e.g. a `git worktree` of an older commit) in the same run, alternating rounds, so the ratio
compares like with like on this machine.

- TTFT: first streamed token of a 256-token prompt, one request at a time (median).
- Decode tok/s: 16 concurrent requests of 64 new tokens each; generated tokens / wall time.
- Calls per request: Generate + Attach + Release + Abort received by the two instances' gRPC
  servers per request (from GetServerInfo's `grpc_calls`; trees that do not count say n/a).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from services.common.process import free_port  # noqa: E402
from services.tools.tiny import make_tiny_model  # noqa: E402

COUNTED = ("Generate", "Attach", "Release", "Abort")


class Pair:
    """A prefill EP2 and a decode EP2 worker started from the checkout at `tree`."""

    def __init__(self, tree: Path, model: Path):
        self.procs: list[subprocess.Popen] = []
        self.addr: dict[str, str] = {}
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
        for role in ("prefill", "decode"):
            port = free_port()
            args = ["--role", role, "--model", str(model), "--port", str(port), "--ep", "2"]
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "services.worker", *args],
                    cwd=tree,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            self.addr[role] = f"127.0.0.1:{port}"
        self.stub = {r: pb_grpc.SglangSchedulerStub(grpc.insecure_channel(a)) for r, a in self.addr.items()}
        deadline = time.monotonic() + 180
        for stub in self.stub.values():
            while True:
                try:
                    if stub.HealthCheck(pb.HealthCheckRequest(), timeout=1).healthy:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not come up")
                time.sleep(0.3)

    def generate(self, room: int, prompt: list[int], max_new: int) -> float:
        """One disaggregated request; returns its time to first token."""
        host, port = self.addr["prefill"].rsplit(":", 1)
        req = pb.GenerateRequest(
            request_id=f"bench-{room}",
            tokenized=pb.TokenizedInput(input_ids=prompt),
            sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=True),
            disaggregated_params=pb.DisaggregatedParams(
                bootstrap_host=host, bootstrap_port=int(port), bootstrap_room=room
            ),
            stream=True,
        )
        start = time.perf_counter()
        pre = threading.Thread(target=lambda: list(self.stub["prefill"].Generate(req, timeout=300)))
        pre.start()
        stream = self.stub["decode"].Generate(req, timeout=300)
        next(stream)
        ttft = time.perf_counter() - start
        list(stream)
        pre.join()
        return ttft

    def calls(self) -> int | None:
        total = 0
        for stub in self.stub.values():
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).scheduler_info
            if "grpc_calls" not in info:
                return None
            calls = info["grpc_calls"]
            total += sum(int(calls[m]) for m in COUNTED if m in calls)
        return total

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def measure(tree: Path, model: Path) -> dict[str, float | None]:
    pair = Pair(tree, model)
    try:
        rooms = iter(range(1, 10**6))
        prompt = [(7 * i) % 470 + 5 for i in range(256)]
        pair.generate(next(rooms), prompt, 1)  # warm
        before = pair.calls()
        ttfts = [pair.generate(next(rooms), prompt, 1) for _ in range(7)]
        after = pair.calls()
        short = [[(3 * i + j) % 470 + 5 for i in range(32)] for j in range(16)]
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(16) as ex:
            list(ex.map(lambda p: pair.generate(next(rooms), p, 64), short))
        wall = time.perf_counter() - start
    finally:
        pair.stop()
    return {
        "ttft_ms": 1000 * statistics.median(ttfts),
        "tok_s": 16 * 64 / wall,
        "calls": None if before is None or after is None else (after - before) / len(ttfts),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--baseline", type=Path, help="another checkout to compare against")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    trees = {"this tree": ROOT} | ({"baseline": a.baseline.resolve()} if a.baseline else {})
    results: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny", "deepseek_v3", seed=1)
        for _ in range(a.rounds):
            for name, tree in reversed(trees.items()):
                results[name].append(measure(tree, model))
    print("EP2 prefill -> EP2 decode, tiny DeepSeek-V3, Mooncake tcp loopback (median over rounds)")
    print(f"{'':>10}{'TTFT ms':>10}{'decode tok/s':>14}{'gRPC calls/request':>20}")
    med = {}
    for name, rows in results.items():
        med[name] = {
            k: statistics.median(r[k] for r in rows) if rows[0][k] is not None else None for k in rows[0]
        }
        m = med[name]
        calls = "n/a" if m["calls"] is None else f"{m['calls']:.0f}"
        print(f"{name:>10}{m['ttft_ms']:>10.1f}{m['tok_s']:>14.0f}{calls:>20}")
    if a.baseline:
        new, old = med["this tree"], med["baseline"]
        ttft, tok_s = new["ttft_ms"] / old["ttft_ms"], new["tok_s"] / old["tok_s"]
        print(f"ratio this/baseline: TTFT {ttft:.2f}, tok/s {tok_s:.2f}")


if __name__ == "__main__":
    main()
