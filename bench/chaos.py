"""A chaos run: clients keep the service busy while a schedule kills, resizes and drains it and
sends it poison; what is lost, wrong or left behind is counted.

    OMP_NUM_THREADS=1 .venv/bin/python bench/chaos.py [--duration-s 600] [--clients 6]
                                                      [--fault-every-s 35] [--ep 2] [--seed 0]

The cluster: the orchestrator with the `local` backend (what `moeserve up` runs), tiny DeepSeek-V3,
2 prefill + 2 decode instances of EP `--ep`, API key and admin token set, loopback only.

1. Reference: every greedy request of the mix is sent once, undisturbed; its text is the reference.
2. Chaos, for `--duration-s`: `--clients` clients send requests back to back, a random mix of
   streaming and not, greedy and sampled (seeded), short (8 tokens) and long (64), over a few
   prompts. Every `--fault-every-s` seconds the next fault of the schedule (below, in turn)
   strikes; every 5 s a poison or malformed request goes in (each must get a 400).
   Faults: SIGKILL a rank of a decode instance (or the process, at EP1), SIGKILL a prefill
   instance's launcher, scale decode 2 -> 3, drain a decode instance, scale decode back to 2,
   SIGKILL a decode launcher, scale prefill 2 -> 1, SIGKILL a prefill rank, scale prefill back to 2.
   After each, the time until every instance the backend keeps is ready again is its recovery.
3. End: clients stop; every instance must hold no request and no KV within 60 s.

Report: requests sent; completed; greedy ones exact (against the reference); failed, by status
and cause, with whether a fault had left a role with no ready instance at that moment; lost (no
answer at all within 120 s); poison answered 400; KV tokens and requests left on the workers at
the end; recovery time per fault.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from secrets import token_hex

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator.up import Cluster, tiny_model, wait_http
from services.common import wire
from services.common.process import free_port

KEY, ADMIN = "chaos-key", "chaos-admin"
PROMPTS = (
    "Tell me about mixture of experts.",
    "What does a prefill worker do?",
    "Explain KV cache transfer in one line.",
    "Why route tokens to experts?",
)
LOST_AFTER_S = 120.0
POISON = (
    ("seed past int64", {"seed": 2**64, "temperature": 1.0}),
    ("top_k past int32", {"top_k": 2**31}),
    ("max_tokens as text", {"max_tokens": "10"}),
    ("stream as text", {"stream": "yes"}),
    ("prompt of booleans", {"prompt": [True, False]}),
)
MALFORMED = (
    ("nested 100k deep", b'{"model": "tiny", "prompt": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("not JSON", b'{"model": "tiny", "prompt": '),
)
FAULTS = (
    "kill a decode rank",
    "kill a prefill launcher",
    "scale decode 2 -> 3",
    "drain a decode instance",
    "scale decode 3 -> 2",
    "kill a decode launcher",
    "scale prefill 2 -> 1",
    "kill a prefill rank",
    "scale prefill 1 -> 2",
)


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    greedy_completed: int = 0
    greedy_exact: int = 0
    lost: int = 0
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    poison: collections.Counter[str] = field(default_factory=collections.Counter)
    recoveries: list[tuple[str, float | None]] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


class Service:
    def __init__(self, url: str):
        self.url = url
        self.api = httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=LOST_AFTER_S,
            limits=httpx.Limits(max_connections=64),
        )  # fmt: skip
        self.admin = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)

    async def instances(self) -> list[dict]:
        return (await self.admin.get("/admin/instances")).json()["data"]

    async def ready_roles(self) -> dict[str, int]:
        counts = {"prefill": 0, "decode": 0}
        for i in await self.instances():
            counts[i["role"]] += i["state"] == "ready"
        return counts

    async def completion(self, body: dict) -> tuple[int, str, str]:
        """(status, text, error) of one request; streams are read to their end."""
        if body.get("stream"):
            text, error = [], ""
            async with self.api.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return r.status_code, "", (await r.aread()).decode()[:200]
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            error = event["error"].get("message", "")[:200]
                        elif event.get("choices"):
                            text.append(event["choices"][0]["text"])
            return (502 if error else 200), "".join(text), error
        r = await self.api.post("/v1/completions", json=body)
        if r.status_code != 200:
            return r.status_code, "", r.text[:200]
        return 200, r.json()["choices"][0]["text"], ""


def request_mix(rng: random.Random) -> tuple[dict, bool]:
    """One request of the mix, and whether it is greedy (its text then has a reference)."""
    greedy = rng.random() < 0.6
    body = {"model": "tiny", "prompt": rng.choice(PROMPTS), "max_tokens": rng.choice((8, 64))}
    body |= {"stream": rng.random() < 0.5, "ignore_eos": True}
    body |= {"temperature": 0.0} if greedy else {"temperature": 0.8, "seed": rng.randrange(2**31)}
    return body, greedy


def reference_key(body: dict) -> tuple[str, int]:
    return body["prompt"], body["max_tokens"]


async def client(
    svc: Service, tally: Tally, reference: dict, until: float, seed: int, roles_at: list
) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        body, greedy = request_mix(rng)
        tally.sent += 1
        try:
            status, text, error = await svc.completion(body)
        except (httpx.TimeoutException, httpx.TransportError) as e:
            tally.lost += 1
            tally.failed[f"lost: {type(e).__name__}"] += 1
            continue
        if status != 200:
            empty = any(n == 0 for n in (roles_at[-1] if roles_at else {}).values())
            cause = error.split('"message":"')[-1][:70] if error else "?"
            tally.failed[
                f"{status} ({'a role had no ready instance' if empty else 'roles served'}): {cause}"
            ] += 1
            continue
        tally.completed += 1
        if greedy:
            tally.greedy_completed += 1
            want = reference[reference_key(body)]
            if text == want:
                tally.greedy_exact += 1
            elif len(tally.mismatches) < 5:
                tally.mismatches.append(f"{body}: {text[:60]!r} != {want[:60]!r}")


async def poisoner(svc: Service, tally: Tally, until: float) -> None:
    kinds = [*POISON, *MALFORMED]
    n = 0
    while time.monotonic() < until:
        name, what = kinds[n % len(kinds)]
        n += 1
        try:
            if isinstance(what, bytes):
                r = await svc.api.post(
                    "/v1/completions", content=what, headers={"content-type": "application/json"}
                )
            else:
                r = await svc.api.post("/v1/completions", json={"model": "tiny", "prompt": "p", **what})
            tally.poison[f"{r.status_code}"] += 1
            if r.status_code != 400:
                tally.poison[f"{name}: {r.status_code}"] += 1
        except httpx.HTTPError as e:
            tally.poison[f"{name}: {type(e).__name__}"] += 1
        await asyncio.sleep(5)


def children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        return [int(c) for t in tasks for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        return []


async def strike(svc: Service, fault: str, rng: random.Random) -> str:
    """Carry out `fault`; what was done."""
    insts = [i for i in await svc.instances() if i["state"] == "ready"]
    role = "decode" if "decode" in fault else "prefill"
    mine = [i for i in insts if i["role"] == role]
    if fault.startswith("scale"):
        count = int(fault.rsplit(" ", 1)[1])
        await svc.admin.post(f"/admin/pools/{role}/scale", json={"count": count})
        return fault
    if not mine:
        return f"{fault}: no ready {role} instance"
    victim = rng.choice(mine)
    if fault.startswith("drain"):
        await svc.admin.post(f"/admin/instances/{victim['id']}/drain", json={"deadline_s": 30})
        return f"{fault} ({victim['id']})"
    pid = victim["pid"]
    if "rank" in fault and (ranks := children(pid)):
        pid = rng.choice(ranks)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return f"{fault} ({victim['id']}, pid {pid})"


async def recovered(svc: Service, limit: float = 120.0) -> float | None:
    """Seconds until every instance the backend keeps is ready (and the desired counts met)."""
    start = time.monotonic()
    await asyncio.sleep(1.0)
    while time.monotonic() - start < limit:
        pools = (await svc.admin.get("/admin/pools")).json()
        insts = await svc.instances()
        live = [i for i in insts if i["state"] not in ("gone", "failed")]
        ready = collections.Counter(i["role"] for i in live if i["state"] == "ready")
        desired = {role: pools[role]["desired"] for role in ("prefill", "decode")}
        if all(ready[r] == desired[r] for r in desired) and len(live) == sum(desired.values()):
            return time.monotonic() - start
        await asyncio.sleep(0.25)
    return None


async def chaos(a: argparse.Namespace, url: str) -> tuple[Tally, dict, list[str]]:
    svc, tally, log = Service(url), Tally(), []
    rng = random.Random(a.seed)
    reference = {}
    for prompt in PROMPTS:  # 1. the undisturbed answers
        for max_tokens in (8, 64):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
            status, text, error = await svc.completion({**body, "ignore_eos": True})
            assert status == 200, error
            reference[(prompt, max_tokens)] = text
    until = time.monotonic() + a.duration_s
    roles_at: list[dict[str, int]] = []

    async def watch_roles() -> None:
        while time.monotonic() < until:
            roles_at.append(await svc.ready_roles())
            await asyncio.sleep(0.5)

    async def faults() -> None:
        n = 0
        await asyncio.sleep(a.fault_every_s / 2)
        while time.monotonic() < until - 10:
            fault = FAULTS[n % len(FAULTS)]
            n += 1
            done = await strike(svc, fault, rng)
            took = await recovered(svc)
            tally.recoveries.append((done, took))
            log.append(f"{done}: recovered in {'-' if took is None else f'{took:.1f}s'}")
            await asyncio.sleep(max(0.0, a.fault_every_s - (took or 0)))

    tasks = [client(svc, tally, reference, until, a.seed * 1000 + i, roles_at) for i in range(a.clients)]
    await asyncio.gather(*tasks, poisoner(svc, tally, until), faults(), watch_roles())
    end = {"kv_tokens": -1, "requests": -1}  # 3. nothing left behind
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        insts = [i for i in await svc.instances() if i["state"] not in ("gone", "failed")]
        end = {
            "kv_tokens": sum(i["kv_used_tokens"] for i in insts),
            "requests": sum(i["running"] + i["waiting"] for i in insts),
            "instances": len(insts),
        }
        if end["kv_tokens"] == 0 and end["requests"] == 0:
            break
        await asyncio.sleep(0.5)
    await svc.api.aclose()
    await svc.admin.aclose()
    return tally, end, log


def report(a: argparse.Namespace, tally: Tally, end: dict, log: list[str], wall: float) -> str:
    took = [t for _, t in tally.recoveries if t is not None]
    median, longest = (statistics.median(took), max(took)) if took else (float("nan"), float("nan"))
    failed = sum(tally.failed.values())
    lines = [
        f"`bench/chaos.py --duration-s {a.duration_s:g} --clients {a.clients} --fault-every-s "
        f"{a.fault_every_s:g} --ep {a.ep} --seed {a.seed}` ({wall:.0f} s in all)",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| requests sent | {tally.sent} |",
        f"| completed | {tally.completed} |",
        f"| greedy completed / exact | {tally.greedy_completed} / {tally.greedy_exact} |",
        f"| failed (an HTTP error) | {failed - tally.lost} |",
        f"| lost (no answer within {LOST_AFTER_S:.0f} s, or the connection dropped) | {tally.lost} |",
        f"| poison and malformed requests: answered 400 / other | {tally.poison['400']} / "
        f"{sum(n for k, n in tally.poison.items() if ':' in k)} |",
        f"| KV tokens / requests left on the workers at the end | {end['kv_tokens']} / {end['requests']} |",
        f"| faults / recovered / recovery p50, max | {len(tally.recoveries)} / {len(took)} / "
        f"{median:.1f} s, {longest:.1f} s |",
        "",
        "```",
        *(f"failed: {n} x {cause}" for cause, n in tally.failed.most_common()),
        *(f"poison: {k}: {n}" for k, n in sorted(tally.poison.items()) if ":" in k),
        *(f"mismatch: {m}" for m in tally.mismatches),
        *log,
        "```",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--fault-every-s", type=float, default=35.0)
    ap.add_argument("--ep", type=int, default=2, help="EP ranks per instance")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cluster, port = Cluster(), free_port()
    model = tiny_model("deepseek_v3")
    serve = ["-m", "orchestrator.serve", "--model", str(model), "--port", str(port), "--membership", "local"]
    serve += ["--served-model-name", "tiny", "--prefill-instances", "2", "--decode-instances", "2"]
    serve += ["--prefill-ep", str(a.ep), "--decode-ep", str(a.ep), "--max-concurrency", "64"]
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    try:
        secrets = {"MOESERVE_API_KEYS": KEY, "MOESERVE_ADMIN_TOKEN": ADMIN, wire.TOKEN_ENV: token_hex(16)}
        log_file = Path(tempfile.mkdtemp(prefix="chaos-")) / "cluster.log"
        print(f"cluster log: {log_file}", file=sys.stderr)
        cluster.spawn("orchestrator", serve, env=secrets, output=log_file)  # and its workers
        wait_http(cluster, f"{url}/ready", 300)
        tally, end, log = asyncio.run(chaos(a, url))
    finally:
        cluster.stop()
    print(report(a, tally, end, log, time.monotonic() - start))


if __name__ == "__main__":
    main()
