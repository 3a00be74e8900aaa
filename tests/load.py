"""Load for tests of pools that change size: clients streaming completions back to back, and the
admin API calls those tests make."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai

from orchestrator.up import wait_http
from services.common.process import free_port
from tests.cluster import LocalCluster

PROMPTS = [f"resize under load {i}" for i in range(4)]
MAX_TOKENS = 12


def admin(url: str, method: str, path: str, **kw) -> dict:
    r = httpx.request(method, f"{url}/admin{path}", timeout=10, **kw)
    assert r.status_code in (200, 202), r.text
    return r.json()


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Clients:
    """`n` threads streaming completions back to back until stopped; they record every answer."""

    def __init__(self, url: str, n: int, max_tokens: int = MAX_TOKENS):
        self.url, self.stop, self.max_tokens = url, threading.Event(), max_tokens
        self.answers: list[tuple[str, str, str]] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def run(self, i: int) -> None:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=120)
        k = i
        while not self.stop.is_set():
            prompt = PROMPTS[k % len(PROMPTS)]
            k += 1
            try:
                stream = client.completions.create(
                    model="deepseek_v3", prompt=prompt, max_tokens=self.max_tokens, temperature=0, stream=True
                )
                text, reason = "", None
                for chunk in stream:
                    text += chunk.choices[0].text
                    reason = chunk.choices[0].finish_reason or reason
                self.answers.append((prompt, text, reason))
            except openai.APIError as e:
                self.failures.append(f"{prompt}: {e}")

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def live(url: str, role: str) -> list[dict]:
    return [i for i in admin(url, "GET", "/instances")["data"] if i["role"] == role]


@contextlib.contextmanager
def local_orchestrator(model_dir: Path, *extra: str) -> Iterator[tuple[LocalCluster, str]]:
    """(cluster, URL) of a ready `moeserve serve --membership local` (its instances are its
    children) with `extra` arguments; stopped on exit."""
    c = LocalCluster()
    port = free_port()
    args = ["-m", "orchestrator.serve", "--model", str(model_dir), "--port", str(port)]
    c.procs["orchestrator"] = c.cluster.spawn("orchestrator", [*args, "--membership", "local", *extra])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(c.cluster, f"{url}/ready", 180)
        yield c, url
    finally:
        c.stop()
