"""The first token from prefill, ahead of the KV: when the KV hand-off then fails, the client has
already seen that token, so the request migrates (prompt + that token to a fresh pair) instead of
starting over, and the answer is still exactly the uninterrupted one."""

from __future__ import annotations

import time

import openai
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from tests.cluster import LocalCluster
from tests.e2e.test_retry import scrape
from tests.oracle import encode, greedy


def first_token_streams(c: LocalCluster) -> int:
    info = c.stub("prefill").GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    return int(dict(info.scheduler_info["grpc_calls"].items()).get("FirstTokens", 0))


def test_a_handoff_that_fails_after_the_first_token_went_ahead_is_migrated_exactly(ds_dir):
    c = LocalCluster()
    try:
        # The prefill's first KV write fails after a stall (a decode it cannot reach): by then the
        # request's first token has gone to the router on its FirstTokens stream.
        env = {"MOESERVE_FAULT_FAIL_KV_WRITES": "1"}
        p = c.worker("prefill", "prefill", ds_dir, "--kv-push", "complete", env=env)
        decodes = [c.worker(f"decode-{i}", "decode", ds_dir) for i in range(2)]
        url = c.orchestrator(ds_dir, [p], decodes)
        deadline = time.monotonic() + 30
        while first_token_streams(c) == 0:  # the router opens it once it finds the prefill ready
            assert time.monotonic() < deadline, "the router never opened the prefill's FirstTokens"
            time.sleep(0.1)
        time.sleep(0.3)  # subscribed (the call is counted as it arrives)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        prompt = "ahead of the KV"
        before = scrape(url)
        chunks = client.completions.create(
            model="deepseek_v3", prompt=prompt, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        pieces, usage = [], None
        for chunk in chunks:
            pieces += [choice.text for choice in chunk.choices]
            usage = chunk.usage or usage
        after = scrape(url)

        def grew(name: str, labels: tuple = ()) -> float:
            return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

        assert ("".join(pieces), "length") == greedy(ds_dir, encode(ds_dir, prompt), 8)
        assert usage.completion_tokens == 8 and usage.prompt_tokens == len(encode(ds_dir, prompt))
        assert grew("moeserve_first_tokens_total", (("source", "prefill"),)) >= 1
        assert grew("moeserve_migrations_total") == 1  # it had a token: a migration ...
        assert grew("moeserve_retries_total") == 0  # ... not a retry from scratch
        c.assert_idle("prefill", "decode-0", "decode-1")
    finally:
        c.stop()
