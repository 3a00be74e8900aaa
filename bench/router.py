"""Router overhead: time to first token added by a router, and sustained requests/s, for no router,
our orchestrator and SGLang's gateway (SMG), against the same workers in one run.

    .venv/bin/python bench/router.py [--requests 512] [--concurrency 32 256] [--max-tokens 8]
                                     [--prompt-len 16] [--skip-smg] [--workers sglang [--step-ms 10]]

One prefill and one decode worker serve three paths. `--workers moeserve` (the default): ours, a
tiny DeepSeek-V3-shaped model on CPU, one torch thread each, Mooncake TCP on loopback.
`--workers sglang`: SGLang's own gRPC workers as the conformance tests run them
(`tests/doubles/sglang_cpu`: SGLang 0.5.23's entry point, smg-grpc-servicer's servicers and
SGLang's bootstrap server, a fake scheduler behind that steps every `--step-ms` with no model),
so what differs between the paths is the router in front of SGLang's servicer. The paths:
- direct: the client itself sends the same GenerateRequest to both workers' gRPC (a fresh
  bootstrap room each) and streams the decode side; no router at all, the baseline;
- moeserve: our orchestrator (`moeserve serve`), OpenAI `/v1/completions`, streaming;
- smg: SMG in PD mode (`smg launch --pd-disaggregation`, PyPI `smg`), the same endpoint.

For each concurrency C and path, C streams run back to back until `--requests` have finished
(after one warm-up round of C), in `--rounds` rounds that take the paths in turn (each round in
another order), so a drift of this shared machine's speed falls on every path alike; a path's
figures pool its rounds: TTFT p50/p99 (request sent -> first streamed token) over all its
requests, and requests/s = completed requests / wall time. Added TTFT = the path's percentile - direct's.
Prompts are distinct texts of `--prompt-len` tokens (direct sends their token ids), greedy,
`ignore_eos`, `--max-tokens` new tokens. The client, the workers and the routers share this
machine's cores, so the figures are for this machine only; the table names it. CPU milliseconds
per request are measured from /proc for the router (for direct: this client, which then does the
router's gRPC work) and the two workers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator.http.tokenizer import Tokenizer
from orchestrator.up import tiny_model
from tests.cluster import LocalCluster

REQUEST_TIMEOUT_S = 300.0
WORDS = ("mixture", "experts", "route", "every", "token", "prefill", "decode", "cache", "latent")
FAILURES = (TimeoutError, RuntimeError, grpc.aio.AioRpcError, aiohttp.ClientError)
"""What a failed request raises (counted, not fatal)."""
ROUTERS = {"moeserve": "orchestrator", "smg": "smg"}
WORKERS = {
    "moeserve": "tiny DeepSeek-V3 on CPU, one torch thread each, Mooncake TCP on loopback",
    "sglang": "SGLang 0.5.23's gRPC servicers (smg-grpc-servicer 0.14.1) and bootstrap server over "
    "a fake scheduler stepping every {a.step_ms:g} ms (`tests/doubles/sglang_cpu`)",
}
"""--workers -> how the report names them."""
TARGET_RPS = {"moeserve": 0.5, "sglang": 0.8}
"""The requests/s ratio each issue asked of moeserve against SMG (#25 for SGLang's workers)."""
"""Path -> the cluster process that routes it."""
COLUMNS = ("path", "streams", "requests", "failed", "TTFT p50 ms", "TTFT p99 ms", "added p50 ms")
COLUMNS += ("added p99 ms", "req/s", "router CPU ms/req", "workers CPU ms/req")


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]
    """What the routers' tokenizer makes of `text` (the direct path sends these)."""


Call = Callable[[Prompt, int], Awaitable[float]]
"""One streamed request of that many new tokens; returns its time to first token in seconds."""


@dataclass(frozen=True)
class Run:
    """One path at one concurrency."""

    path: str
    streams: int
    ttft: list[float]
    failed: int
    wall_s: float
    cpu_s: dict[str, float]
    """CPU seconds each process spent during the run: the router (or, direct, this client), workers."""

    def pct(self, q: int) -> float:
        if len(self.ttft) < 2:
            return math.nan
        return statistics.quantiles(self.ttft, n=100, method="inclusive")[q - 1]

    def cpu_ms(self, process: str) -> float:
        """CPU milliseconds per completed request."""
        return 1e3 * self.cpu_s[process] / max(1, len(self.ttft))

    @property
    def rps(self) -> float:
        return len(self.ttft) / self.wall_s

    @classmethod
    def pooled(cls, rounds: list[Run]) -> Run:
        """One path's rounds at one concurrency as one run."""
        cpu = {name: sum(r.cpu_s[name] for r in rounds) for name in rounds[0].cpu_s}
        ttft = [t for r in rounds for t in r.ttft]
        first = rounds[0]
        return cls(
            first.path, first.streams, ttft, sum(r.failed for r in rounds), sum(r.wall_s for r in rounds), cpu
        )


def make_prompts(tok: Tokenizer, n: int, length: int) -> list[Prompt]:
    """`n` distinct texts of `length` tokens (the request number comes first, so none repeats)."""
    out = []
    for i in range(n):
        text = f"{i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(length))
        text = tok.decode(tok.encode(text)[:length])
        out.append(Prompt(text, tok.encode(text)))
    return out


class Direct:
    """The baseline: the client plays the router's part, one Generate to each worker."""

    def __init__(self, prefill: str, decode: str, bootstrap_port: int | None = None):
        self.prefill = pb_grpc.SglangSchedulerStub(grpc.aio.insecure_channel(prefill))
        self.decode = pb_grpc.SglangSchedulerStub(grpc.aio.insecure_channel(decode))
        host, port = prefill.rsplit(":", 1)  # ours: the bootstrap server is on the gRPC port
        self.bootstrap = dict(bootstrap_host=host, bootstrap_port=bootstrap_port or int(port))
        self.rooms = itertools.count(random.randint(1, 2**30))  # an int32 on SGLang's wire

    async def __call__(self, prompt: Prompt, max_tokens: int) -> float:
        room = next(self.rooms)
        request = pb.GenerateRequest(
            request_id=f"direct-{room}",
            tokenized=pb.TokenizedInput(input_ids=prompt.ids),
            sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=max_tokens, ignore_eos=True),
            disaggregated_params=pb.DisaggregatedParams(bootstrap_room=room, **self.bootstrap),
            stream=True,
        )
        start = time.perf_counter()
        prefill = asyncio.ensure_future(_drain(self.prefill.Generate(request, timeout=REQUEST_TIMEOUT_S)))
        first = last = None
        async for last in self.decode.Generate(request, timeout=REQUEST_TIMEOUT_S):
            if first is None and last.HasField("chunk"):
                first = time.perf_counter()
        await prefill
        if first is None or last is None or not last.HasField("complete"):
            raise RuntimeError(f"decode stream of room {room} ended without tokens or completion")
        return first - start


async def _drain(call) -> None:
    async for _ in call:
        pass


class Completions:
    """OpenAI `/v1/completions` streaming through a router at `url`."""

    def __init__(self, url: str, model: str, session: aiohttp.ClientSession):
        self.url, self.model, self.session = f"{url}/v1/completions", model, session

    async def __call__(self, prompt: Prompt, max_tokens: int) -> float:
        body = dict(model=self.model, prompt=prompt.text, max_tokens=max_tokens, temperature=0.0)
        body |= dict(ignore_eos=True, stream=True)
        start = time.perf_counter()
        first, done = None, False
        async with self.session.post(self.url, json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"{self.url} answered {r.status}: {(await r.text())[:200]}")
            async for line in r.content:
                if first is None and line.startswith(b"data: {") and b'"choices"' in line:
                    first = time.perf_counter()
                done = done or line.startswith(b"data: [DONE]")
        if first is None or not done:
            raise RuntimeError(f"{self.url}: stream ended without tokens or [DONE]")
        return first - start


def cpu_seconds(roots: list[int]) -> float:
    """User + system CPU seconds so far of processes and their live descendants (threads included);
    this process counts alone (the cluster is its children)."""
    if roots == [os.getpid()]:
        return time.process_time()
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, ticks
    tree, ticks = set(roots), 0
    for pid in sorted(stats):  # children have larger pids than their parents here
        if pid in tree or stats[pid][0] in tree:
            tree.add(pid)
            ticks += stats[pid][1]
    return ticks / os.sysconf("SC_CLK_TCK")


async def drive(
    path: str, call: Call, prompts: list[Prompt], streams: int, max_tokens: int, pids: dict[str, list[int]]
) -> Run:
    """`streams` clients sending `prompts` back to back until none is left."""
    todo, ttft, errors = iter(prompts), [], []

    async def client() -> None:
        for prompt in todo:  # one iterator shared by every client: each prompt goes once
            try:
                ttft.append(await call(prompt, max_tokens))
            except FAILURES as e:
                errors.append(e)

    before = {name: cpu_seconds(roots) for name, roots in pids.items()}
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(streams)))
    wall = time.perf_counter() - start
    cpu = {name: cpu_seconds(roots) - before[name] for name, roots in pids.items()}
    run = Run(path, streams, ttft, len(errors), wall, cpu)
    if errors:
        print(f"{path} at {streams} streams: {len(errors)} failed, first: {errors[0]!r}", file=sys.stderr)
    return run


async def until_served(path: str, call: Call, prompt: Prompt, timeout: float = 60.0) -> None:
    """A router may report ready before it has found its workers healthy: wait for one answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await call(prompt, 1)
            return
        except FAILURES as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} served no request in {timeout:.0f}s: {e!r}") from None
            await asyncio.sleep(0.5)


async def measure(
    a: argparse.Namespace,
    workers: tuple[str, str, int | None],
    urls: dict[str, str],
    model: Path,
    pids: dict[str, list[int]],
):
    prompts = make_prompts(Tokenizer(model), a.requests + max(a.concurrency), a.prompt_len)
    warm, timed = prompts[a.requests :], prompts[: a.requests]
    connector = aiohttp.TCPConnector(limit=0)  # no pool cap: every stream gets its own connection
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        calls: dict[str, Call] = {"direct": Direct(*workers)}  # (its channels need this loop)
        calls |= {path: Completions(url, model.name, session) for path, url in urls.items()}
        for path, call in calls.items():
            await until_served(path, call, warm[0])
        runs = []
        paths = list(calls)
        for streams in a.concurrency:
            rounds: dict[str, list[Run]] = {path: [] for path in paths}
            for turn in range(a.rounds):
                for path in paths[turn % len(paths) :] + paths[: turn % len(paths)]:
                    call = calls[path]
                    watched = {"router": pids[path], "workers": pids["workers"]}
                    await drive(path, call, warm[:streams], streams, a.max_tokens, watched)
                    rounds[path].append(r := await drive(path, call, timed, streams, a.max_tokens, watched))
                    print(
                        f"{path:>9} {streams:>4} streams, round {turn + 1}: p50 {1e3 * r.pct(50):.1f} ms, "
                        f"{r.rps:.1f} req/s, router CPU {r.cpu_ms('router'):.2f} ms/request"
                    )
            runs += [Run.pooled(rounds[path]) for path in paths]
    return runs


def machine() -> str:
    cpus = len(os.sched_getaffinity(0))
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{cpus} CPU cores (`nproc`), {names[0] if names else 'CPU model unknown'}"


def ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}" if y and not math.isnan(x / y) else "n/a"


def report(runs: list[Run], a: argparse.Namespace) -> str:
    """The Markdown for docs/benchmarks.md."""
    base = {r.streams: r for r in runs if r.path == "direct"}
    lines = [
        f"`bench/router.py --workers {a.workers}"
        + (f" --step-ms {a.step_ms:g}" if a.workers == "sglang" else "")
        + f" --requests {a.requests} --rounds {a.rounds} "
        f"--concurrency {' '.join(map(str, a.concurrency))} "
        f"--max-tokens {a.max_tokens} --prompt-len {a.prompt_len}`",
        "",
        f"- machine: {machine()}",
        f"- workers: one prefill + one decode, {WORKERS[a.workers].format(a=a)}",
        f"- load: {a.prompt_len}-token prompts, {a.max_tokens} new tokens, greedy, ignore_eos; "
        f"{a.requests} timed requests per round after a warm-up, {a.rounds} rounds taking the paths in "
        "turn, pooled per row; added = path - direct",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---" + "|---:" * (len(COLUMNS) - 1) + "|",
    ]
    for r in runs:
        d = base[r.streams]
        p50, p99 = 1e3 * r.pct(50), 1e3 * r.pct(99)
        added = (p50 - 1e3 * d.pct(50), p99 - 1e3 * d.pct(99)) if r.path != "direct" else None
        extra = f"{added[0]:+.1f} | {added[1]:+.1f}" if added else "— | —"
        lines.append(
            f"| {r.path} | {r.streams} | {len(r.ttft)} | {r.failed} | {p50:.1f} | {p99:.1f} | {extra} "
            f"| {r.rps:.1f} | {r.cpu_ms('router'):.2f} | {r.cpu_ms('workers'):.2f} |"
        )
    by = {(r.path, r.streams): r for r in runs}
    if any(path == "smg" for path, _ in by):
        lines.append("")
        for streams in base:
            ours, smg = by[("moeserve", streams)], by[("smg", streams)]
            gap = 1e3 * (ours.pct(50) - smg.pct(50))  # = our added p50 - smg's added p50
            cpu = ratio(ours.cpu_ms("router"), smg.cpu_ms("router"))
            lines.append(
                f"- {streams} streams: moeserve req/s ÷ smg req/s = {ratio(ours.rps, smg.rps)} "
                f"(target ≥ {TARGET_RPS[a.workers]}); "
                f"moeserve added TTFT p50 − smg's = {gap:+.1f} ms (target ≤ 0); "
                f"router CPU per request moeserve ÷ smg = {cpu}"
            )
    return "\n".join(lines)


def start_workers(cluster: LocalCluster, a: argparse.Namespace, model: Path) -> tuple[str, str, int | None]:
    """The prefill's and the decode's gRPC addresses, and SGLang's bootstrap port (None: ours, on
    the prefill's gRPC port). Every stream of the largest concurrency runs at once on the workers,
    so what differs between the paths is the router, not the workers' wait queue."""
    most = max(a.concurrency)
    if a.workers == "moeserve":
        seqs = ("--max-num-seqs", str(most))
        prefill = cluster.worker("prefill", "prefill", model, *seqs)
        return prefill, cluster.worker("decode", "decode", model, *seqs), None
    records = Path(tempfile.mkdtemp(prefix="bench-router-"))
    sizes = ("--max-running-requests", str(2 * most), "--max-total-tokens", str(1 << 20))
    sizes += ("--served-model-name", model.name)  # the id SMG routes by (else the model's path)
    double = ("--step-ms", str(a.step_ms))
    prefill, bootstrap = cluster.sglang_worker(
        "prefill", model, records / "prefill.jsonl", "--disaggregation-mode", "prefill", *sizes, double=double
    )
    decode, _ = cluster.sglang_worker(
        "decode", model, records / "decode.jsonl", "--disaggregation-mode", "decode", *sizes, double=double
    )
    cluster.wait_sglang(prefill)
    cluster.wait_sglang(decode)
    return prefill, decode, bootstrap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=512, help="timed requests per path and concurrency")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 256], help="concurrent streams")
    ap.add_argument("--max-tokens", type=int, default=8, help="new tokens per request")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per concurrency, the paths in turn")
    ap.add_argument("--skip-smg", action="store_true", help="measure direct and moeserve only")
    ap.add_argument("--workers", choices=sorted(WORKERS), default="moeserve", help="whose workers serve")
    ap.add_argument("--step-ms", type=float, default=10.0, help="--workers sglang: a scheduler step")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill also stops the children
    most = max(a.concurrency)
    model = tiny_model("deepseek_v3")
    cluster = LocalCluster()
    try:
        workers = prefill, decode, bootstrap = start_workers(cluster, a, model)
        # Room for every stream and the warm-up round: no 429 from admission.
        limits = ("--max-concurrency", str(2 * most), "--max-queue", str(2 * most))
        prefill_arg = [prefill] if bootstrap is None else [f"grpc://{prefill}", str(bootstrap)]
        urls = {"moeserve": cluster.orchestrator(model, prefill_arg, [decode], *limits)}
        if not a.skip_smg:
            urls["smg"] = cluster.smg(model, prefill, decode, bootstrap)
        pids = {path: [cluster.procs[name].pid] for path, name in ROUTERS.items() if name in cluster.procs}
        pids |= {"direct": [os.getpid()], "workers": [cluster.procs[n].pid for n in ("prefill", "decode")]}
        runs = asyncio.run(measure(a, workers, urls, model, pids))
    finally:
        cluster.stop()
    print()
    print(report(runs, a))


if __name__ == "__main__":
    main()
