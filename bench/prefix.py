"""Prefix caching and cache-aware routing on a multi-turn chat workload, through `moeserve up`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/prefix.py [--conversations 16] [--turns 6] [--concurrency 4]

Two prefill instances and one decode instance (tiny DeepSeek-V3, EP1, CPU), started fresh for
each of three runs of the same workload: `prefix_affinity` routing with the prefix cache,
`least_load` routing with the cache, and the cache off (`--no-prefix-cache`, least load). The
workload: `--conversations` chats over 4 shared system prompts (about 1,000 tokens each), each
`--turns` turns long; every turn sends the system prompt, the whole history so far (the model's
own earlier answers included) and a new user message, and streams 16 tokens back.
`--concurrency` conversations run at once, each turn after the previous one's answer.

Figures per run: time to first token p50/p99 over all turns, and prefill tokens computed =
sum of (prompt tokens - cached tokens) from each response's usage (what prefill found in its
cache is exactly what it did not compute). Targets: with affinity, prefill compute <= 0.5x the
cache-off run and TTFT p50 <= 0.6x of it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.router import machine
from orchestrator.up import Cluster, tiny_model, wait_http
from services.common.process import free_port

RUNS = {
    "prefix_affinity": ["--prefill-policy", "prefix_affinity"],
    "least_load": ["--prefill-policy", "least_load"],
    "cache off": ["--prefill-policy", "least_load", "--worker-arg=--no-prefix-cache"],
}
WORDS = [
    "expert",
    "router",
    "token",
    "cache",
    "prefill",
    "decode",
    "latent",
    "page",
    "rank",
    "group",
    "shard",
    "batch",
]


@dataclass
class Turn:
    ttft: float
    prompt_tokens: int
    cached_tokens: int


def system_prompt(i: int) -> str:
    rng = random.Random(i)
    return f"System {i}. " + " ".join(rng.choice(WORDS) for _ in range(400))


def converse(url: str, model: str, system: str, seed: int, turns: int) -> list[Turn]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    rng = random.Random(seed)
    messages = [{"role": "system", "content": system}]
    out = []
    for _ in range(turns):
        messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(20))})
        start = time.monotonic()
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        first, text, usage = None, [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic()
                text.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        assert usage is not None
        details = usage.prompt_tokens_details
        out.append(Turn((first or time.monotonic()) - start, usage.prompt_tokens, details.cached_tokens or 0))
        messages.append({"role": "assistant", "content": "".join(text)})
    return out


def run(name: str, extra: list[str], a: argparse.Namespace, model: Path) -> list[Turn]:
    cluster, port = Cluster(), free_port()
    try:
        args = ["-m", "orchestrator.up", "--model", str(model), "--port", str(port), "--prefill", "2"]
        args += ["--decode", "1", "--prefill-ep", "1", "--decode-ep", "1", "--log-level", "warning", *extra]
        cluster.spawn("orchestrator", args)
        url = f"http://127.0.0.1:{port}"
        wait_http(cluster, f"{url}/ready", 180)
        deadline = time.monotonic() + 180  # every instance serving before the clock starts
        while len([ok for ok in httpx.get(f"{url}/ready").json()["workers"].values() if ok]) < 3:
            if time.monotonic() > deadline:
                raise RuntimeError("the three instances did not all become ready in 180 s")
            time.sleep(0.5)
        converse(url, model.name, "warm-up", 0, 1)
        systems = [system_prompt(i) for i in range(4)]
        with cf.ThreadPoolExecutor(a.concurrency) as pool:
            jobs = [
                pool.submit(converse, url, model.name, systems[c % 4], 1000 + c, a.turns)
                for c in range(a.conversations)
            ]
            turns = [t for job in jobs for t in job.result()]
    finally:
        cluster.stop()
    p50, p99 = (1e3 * statistics.quantiles([t.ttft for t in turns], n=100)[q - 1] for q in (50, 99))
    computed = sum(t.prompt_tokens - t.cached_tokens for t in turns)
    print(
        f"{name:>16}: TTFT p50 {p50:.0f} ms, p99 {p99:.0f} ms, prefill computed {computed} tokens", flush=True
    )
    return turns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    model = tiny_model("deepseek_v3")
    results = {name: run(name, extra, a, model) for name, extra in RUNS.items()}
    off = results["cache off"]

    def p50(turns: list[Turn]) -> float:
        return statistics.median(t.ttft for t in turns)

    def computed(turns: list[Turn]) -> int:
        return sum(t.prompt_tokens - t.cached_tokens for t in turns)

    print(f"\n- machine: {machine()}")
    shape = f"{a.conversations} conversations x {a.turns} turns over 4 system prompts"
    print(f"- {shape}, {a.concurrency} at once\n")
    print("| run | turns | prompt tokens | cached tokens | prefill computed | vs cache off | TTFT p50 ms "
          "| TTFT p99 ms | p50 vs cache off |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, turns in results.items():
        ttfts = sorted(t.ttft for t in turns)
        p99 = 1e3 * statistics.quantiles(ttfts, n=100)[98]
        print(
            f"| {name} | {len(turns)} | {sum(t.prompt_tokens for t in turns)} | "
            f"{sum(t.cached_tokens for t in turns)} | {computed(turns)} | "
            f"{computed(turns) / computed(off):.2f} | {1e3 * p50(turns):.0f} | {p99:.0f} | "
            f"{p50(turns) / p50(off):.2f} |"
        )
    ours = results["prefix_affinity"]
    print(
        f"\ntargets (prefix_affinity vs cache off): prefill compute {computed(ours) / computed(off):.2f}x "
        f"(<= 0.5), TTFT p50 {p50(ours) / p50(off):.2f}x (<= 0.6)"
    )


if __name__ == "__main__":
    main()
