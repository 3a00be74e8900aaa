"""Resizing pools on the `local` backend: how long a scale-up takes to serve, and what a scale-down
costs the clients that keep running.

    OMP_NUM_THREADS=1 .venv/bin/python bench/pools.py [--clients 4] [--steady-s 15]

An orchestrator with the local backend (tiny DeepSeek-V3, EP1 instances, one prefill) and
`--clients` threads streaming 16-token completions back to back. Figures:
- scale-up: from `POST /admin/pools/decode/scale {"count": 2}` to the new decode instance's first
  served request (process start, model load, Mooncake, first health check included);
- scale-down: p50/p99 time to first token of the requests started while decode goes 2 -> 1
  (drain, then stop), against the same clients in a steady run of one decode instance beforehand.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator.up import Cluster, tiny_model, wait_http
from services.common.process import free_port


class Traffic:
    """Clients streaming back to back; every request's (start time, time to first token)."""

    def __init__(self, url: str, n: int):
        self.url, self.stop = url, threading.Event()
        self.samples: list[tuple[float, float]] = []
        self.failures = 0
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def run(self, i: int) -> None:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=120)
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                stream = client.completions.create(
                    model="tiny", prompt=f"client {i} at {start:.3f}", max_tokens=16, stream=True
                )
                first = None
                for _ in stream:
                    first = first or time.monotonic()
                self.samples.append((start, (first or time.monotonic()) - start))
            except openai.APIError:
                self.failures += 1

    def between(self, a: float, b: float) -> list[float]:
        return [ttft for start, ttft in self.samples if a <= start < b]

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else float("nan")


def admin(url: str, method: str, path: str, **kw):
    return httpx.request(method, f"{url}/admin{path}", timeout=10, **kw).json()


def decodes(url: str) -> list[dict]:
    return [i for i in admin(url, "GET", "/instances")["data"] if i["role"] == "decode"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steady-s", type=float, default=15.0)
    args = ap.parse_args()
    cluster, port = Cluster(), free_port()
    model = tiny_model("deepseek_v3")
    serve = ["-m", "orchestrator.serve", "--model", str(model), "--port", str(port), "--membership", "local"]
    cluster.spawn("orchestrator", [*serve, "--served-model-name", "tiny"])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(cluster, f"{url}/ready", 180)
        traffic = Traffic(url, args.clients)
        t0 = time.monotonic()
        time.sleep(args.steady_s)
        steady = traffic.between(t0 + 2, time.monotonic())  # the first seconds warm up

        (first,) = decodes(url)
        asked = time.monotonic()
        admin(url, "POST", "/pools/decode/scale", json={"count": 2})
        while not any(i["id"] != first["id"] and i["served"] > 0 for i in decodes(url)):
            time.sleep(0.05)
        scale_up_s = time.monotonic() - asked
        time.sleep(5)

        down = time.monotonic()
        admin(url, "POST", "/pools/decode/scale", json={"count": 1})
        while len(decodes(url)) > 1:
            time.sleep(0.05)
        done = time.monotonic()
        time.sleep(2)
        during = traffic.between(down, done + 2)
        traffic.close()
    finally:
        cluster.stop()
    print(f"local backend, tiny DeepSeek-V3, EP1 instances, {args.clients} streaming clients")
    print(f"scale-up 1 -> 2 decode: first request on the new instance {scale_up_s:.2f}s after the scale call")
    print(f"scale-down 2 -> 1 decode: drained and stopped in {done - down:.2f}s")
    print(f"{'TTFT ms':>24}{'requests':>10}{'p50':>8}{'p99':>8}")
    for name, values in (("steady, 1 decode", steady), ("during scale-down", during)):
        print(f"{name:>24}{len(values):>10}{1e3 * pct(values, 50):>8.1f}{1e3 * pct(values, 99):>8.1f}")
    ratio = pct(during, 99) / pct(steady, 99)
    print(f"p99 ratio (scale-down / steady): {ratio:.2f}; failed requests: {traffic.failures}")


if __name__ == "__main__":
    main()
