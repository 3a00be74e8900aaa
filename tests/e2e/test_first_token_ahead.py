"""The first token from prefill, ahead of the KV: when the KV hand-off then fails, the client has
already seen that token, so the request migrates (prompt + that token to a fresh pair) instead of
starting over, and the answer is still exactly the uninterrupted one."""

from __future__ import annotations

import openai

from tests.cluster import LocalCluster, wait_first_tokens
from tests.e2e.test_retry import scrape
from tests.oracle import encode, greedy


def test_a_handoff_that_fails_after_the_first_token_went_ahead_is_migrated_exactly(ds_dir):
    c = LocalCluster()
    try:
        # The prefill's first KV write fails after a stall (a decode it cannot reach): by then the
        # request's first token has gone to the router on its FirstTokens stream.
        env = {"MOESERVE_FAULT_FAIL_KV_WRITES": "1"}
        p = c.worker("prefill", "prefill", ds_dir, "--kv-push", "complete", env=env)
        decodes = [c.worker(f"decode-{i}", "decode", ds_dir) for i in range(2)]
        url = c.orchestrator(ds_dir, [p], decodes)
        wait_first_tokens(url)
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
