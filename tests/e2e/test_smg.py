"""Interoperability: SGLang's Rust gateway SMG (PyPI `smg`), in PD mode, drives our workers over gRPC."""

from __future__ import annotations

import time

import httpx
import pytest

from services.engine import Engine, SamplingParams
from tests.cluster import LocalCluster


@pytest.fixture(scope="module")
def smg_url(ds_dir):
    c = LocalCluster()
    try:
        p = c.worker("prefill", "prefill", ds_dir)
        d = c.worker("decode", "decode", ds_dir)
        yield c.smg(ds_dir, p, d), c
    finally:
        c.stop()


def test_smg_serves_a_chat_completion_through_our_workers(smg_url, ds_dir):
    url, cluster = smg_url
    from orchestrator.http.tokenizer import Tokenizer

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
