"""Interoperability: SGLang's Rust gateway SMG (PyPI `smg`), in PD mode, drives our workers over gRPC."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.engine import Engine, SamplingParams
from services.process import free_port
from tests.cluster import LocalCluster

SMG = shutil.which("smg") or str(Path(sys.executable).with_name("smg"))


@pytest.fixture(scope="module")
def smg_url(ds_dir):
    c = LocalCluster()
    smg = None
    try:
        p = c.worker("prefill", "prefill", ds_dir)
        d = c.worker("decode", "decode", ds_dir)
        port, prom = free_port(), free_port()
        cmd = [
            SMG,
            "launch",
            "--pd-disaggregation",
            "--prefill",
            f"grpc://{p}",
            p.rsplit(":", 1)[1],
            "--decode",
            f"grpc://{d}",
            "--model-path",
            str(ds_dir),
            "--tokenizer-path",
            str(ds_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(prom),
            "--log-level",
            "error",
        ]
        smg = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert smg.poll() is None, "smg exited"
            try:
                if httpx.get(f"{url}/readiness", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield url, c
    finally:
        if smg is not None:
            smg.terminate()
            smg.wait(10)
        c.stop()


def test_smg_serves_a_chat_completion_through_our_workers(smg_url, ds_dir):
    url, cluster = smg_url
    from orchestrator.tokenizer import Tokenizer

    messages = [{"role": "user", "content": "Hello"}]
    prompt = Tokenizer(ds_dir).apply_chat_template(messages)
    expected = Engine.from_pretrained(ds_dir).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0)
    )[0]
    tok = Tokenizer(ds_dir)
    deadline = time.monotonic() + 30
    while True:  # SMG may take a moment to mark freshly registered workers healthy
        r = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=30,
            json={"model": ds_dir.name, "messages": messages, "max_tokens": 8, "temperature": 0},
        )
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    body = r.json()
    # SMG's detokenizer drops an incomplete UTF-8 sequence at the very end, which a one-shot
    # decode renders as U+FFFD; the tokens (and everything before them) are the same.
    assert body["choices"][0]["message"]["content"] == tok.decode(expected.output_token_ids).rstrip("\ufffd")
    assert body["usage"]["completion_tokens"] == len(expected.output_token_ids)
    for name in ("prefill", "decode"):
        load = cluster.load(name)
        assert load.num_used_tokens == 0 and load.num_total_reqs == 0
