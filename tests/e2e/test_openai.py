"""The whole disaggregated path, driven by the official `openai` client.

Real processes: a prefill worker, a decode worker and the orchestrator, on loopback. Expected
text comes from `transformers` greedy decoding of the same model and prompt.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import time

import httpx
import openai
import pytest
import transformers

from services.engine import Engine, SamplingParams
from tests.cluster import LocalCluster
from tests.oracle import chat_ids, encode, greedy, greedy_ids, greedy_logprobs

KEY = "test-key"
QUESTION = "What is a mixture of experts?"


@pytest.fixture(scope="module")
def served(ds_dir):
    c = LocalCluster()
    try:
        p = c.worker("prefill", "prefill", ds_dir)
        d = c.worker("decode", "decode", ds_dir)
        url = c.orchestrator(ds_dir, [p], [d], "--api-key", KEY)
        yield c, url
    finally:
        c.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[1]}/v1", api_key=KEY, max_retries=0, timeout=60)


def model_name(ds_dir) -> str:
    return ds_dir.name


def chat_prompt(ds_dir, content: str) -> list[int]:
    return chat_ids(ds_dir, [{"role": "user", "content": content}])


def test_chat_completion_matches_transformers(client, ds_dir, served):
    text, reason = greedy(ds_dir, chat_prompt(ds_dir, QUESTION), 24)
    res = client.chat.completions.create(
        model=model_name(ds_dir),
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
        temperature=0,
    )
    assert res.choices[0].message.content == text
    assert res.choices[0].finish_reason == reason
    assert res.usage.prompt_tokens == len(chat_prompt(ds_dir, QUESTION))
    assert res.usage.prompt_tokens_details.cached_tokens == 0  # transferred KV is not a cache hit
    served[0].assert_idle()


def test_streamed_chat_completion_matches_and_reports_usage(client, ds_dir):
    text, reason = greedy(ds_dir, chat_prompt(ds_dir, "Hello, how are you?"), 20)
    stream = client.chat.completions.create(
        model=model_name(ds_dir),
        messages=[{"role": "user", "content": "Hello, how are you?"}],
        max_completion_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        reason
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 20


@pytest.mark.parametrize("stream", [False, True])
def test_completions_match_transformers(client, ds_dir, stream):
    prompt = "The KV cache moves from the prefill worker to"
    text, _ = greedy(ds_dir, encode(ds_dir, prompt), 16)
    res = client.completions.create(
        model=model_name(ds_dir), prompt=prompt, max_tokens=16, temperature=0, stream=stream
    )
    got = "".join(c.choices[0].text for c in res) if stream else res.choices[0].text
    assert got == text


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_are_the_models_across_the_handoff(client, ds_dir, stream):
    """The first token's log-probability comes from prefill (over the KV hand-off), the rest from
    decode; all equal transformers' log-softmax, with the top 3 alternatives in order."""
    prompt = chat_prompt(ds_dir, QUESTION)
    ids, expected = greedy_ids(ds_dir, prompt, 8), greedy_logprobs(ds_dir, prompt, 8)
    res = client.chat.completions.create(
        model=model_name(ds_dir), messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
        temperature=0, logprobs=True, top_logprobs=3, stream=stream, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(res) if stream else [res]
    choices = [choice for ch in chunks for choice in ch.choices if choice.logprobs]
    content = [c for choice in choices for c in choice.logprobs.content]
    tok = transformers.AutoTokenizer.from_pretrained(ds_dir)
    assert [c.token for c in content] == [tok.decode([t]) for t in ids]
    for c, t, lp in zip(content, ids, expected, strict=True):
        assert c.logprob == pytest.approx(float(lp[t]), abs=1e-3)
        top = lp.topk(3)
        assert [x.token for x in c.top_logprobs] == [tok.decode([i]) for i in top.indices.tolist()]
        assert [x.logprob for x in c.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert c.bytes == list(c.token.encode())


def test_completion_logprobs_stream_equals_body(client, ds_dir):
    kw = dict(model=model_name(ds_dir), prompt="Experts are", max_tokens=6, temperature=0, logprobs=2)
    body = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
    streamed = [(t, v) for c in chunks if c.logprobs for t, v in zip(*_columns(c.logprobs), strict=True)]
    assert streamed == list(zip(*_columns(body.logprobs), strict=True))
    assert "".join(body.logprobs.tokens) == body.text
    assert body.logprobs.text_offset == [len("".join(body.logprobs.tokens[:i])) for i in range(6)]
    assert all(len(top) == 2 for top in body.logprobs.top_logprobs)
    plain = client.completions.create(model=model_name(ds_dir), prompt="Experts are", max_tokens=2)
    assert plain.choices[0].logprobs is None


def _columns(logprobs) -> tuple[list[str], list[float]]:
    return logprobs.tokens, logprobs.token_logprobs


@pytest.mark.parametrize("stream", [False, True])
def test_echo_of_a_token_id_prompt(client, ds_dir, stream):
    ids = encode(ds_dir, "Routers route")
    res = client.completions.create(
        model=model_name(ds_dir), prompt=ids, max_tokens=4, temperature=0, echo=True, stream=stream
    )
    text = "".join(c.choices[0].text for c in res) if stream else res.choices[0].text
    prompt = transformers.AutoTokenizer.from_pretrained(ds_dir).decode(ids)
    assert text == prompt + greedy(ds_dir, ids, 4)[0]


def test_sixteen_concurrent_streams_are_independent(client, ds_dir, served):
    prompts = [list(range(10 + i, 30 + 3 * i)) for i in range(16)]
    engine = Engine.from_pretrained(ds_dir)
    expected = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    tok = transformers.AutoTokenizer.from_pretrained(ds_dir)

    def one(ids: list[int]) -> str:
        stream = client.completions.create(
            model=model_name(ds_dir),
            prompt=ids,
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join(c.choices[0].text for c in stream)

    with cf.ThreadPoolExecutor(16) as ex:
        texts = list(ex.map(one, prompts))
    for text, exp in zip(texts, expected, strict=True):
        assert text == tok.decode(exp.output_token_ids, skip_special_tokens=True)
    served[0].assert_idle()


def test_stop_string_trims_and_frees(client, ds_dir, served):
    free = (
        client.completions.create(
            model=model_name(ds_dir),
            prompt=[5, 6, 7],
            max_tokens=30,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    stop = free[5:8]
    res = client.completions.create(
        model=model_name(ds_dir),
        prompt=[5, 6, 7],
        max_tokens=30,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert res.choices[0].text == free[: free.index(stop)]
    assert res.choices[0].finish_reason == "stop"
    served[0].assert_idle()


def test_client_disconnect_mid_stream_frees_both_workers(served, ds_dir):
    c, url = served
    body = {
        "model": model_name(ds_dir),
        "prompt": list(range(1, 50)),
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert c.load("decode").num_used_tokens > 0
    # The connection is closed mid-stream: both workers must drop the request and its KV.
    c.assert_idle()


def test_a_non_streaming_client_that_leaves_ends_its_request_at_once(served, ds_dir):
    """Not streaming, nothing is sent until the end: the orchestrator must notice the client left
    (it used to run to max_tokens, holding KV and its admission slot)."""
    c, url = served
    body = {"model": model_name(ds_dir), "prompt": list(range(1, 50)), "max_tokens": 1990, "ignore_eos": True}
    with httpx.Client() as http, contextlib.suppress(httpx.TimeoutException):
        http.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    start = time.monotonic()
    c.assert_idle(timeout=10)
    assert time.monotonic() - start < 1.5  # the answer alone would take seconds more


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"model": "M"}', 400, "messages"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "does not exist"),
        (
            b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
            400,
            "max_tokens",
        ),
        (b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}', 400, "top_p"),
        (
            b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": -1}',
            400,
            "temperature",
        ),
        (b'{"model": "M", "messages": [{"role": "robot", "content": "x"}]}', 400, "role"),
        (
            b'{"model": "M", "messages": [{"role": "user", "content": "' + b"word " * 3000 + b'"}]}',
            400,
            "context",
        ),
    ],
)
def test_bad_http_input_gets_openai_errors(served, ds_dir, body, status, fragment):
    c, url = served
    body = body.replace(b'"M"', f'"{model_name(ds_dir)}"'.encode())
    r = httpx.post(
        f"{url}/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"]
    c.assert_idle()


def test_auth_and_client_errors(served, ds_dir):
    _, url = served
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == [model_name(ds_dir)]
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        good.completions.create(model=model_name(ds_dir), prompt="x", max_tokens=0)
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/ready").json()["status"] == "ready"


def test_killed_prefill_gives_a_clear_error_and_frees_decode(ds_dir):
    c = LocalCluster()
    try:
        p = c.worker("prefill", "prefill", ds_dir, "--max-prefill-tokens", "4")
        d = c.worker("decode", "decode", ds_dir)
        url = c.orchestrator(ds_dir, [p], [d])
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(
                client.completions.create,
                model=model_name(ds_dir),
                prompt=[i % 500 for i in range(1, 1500)],
                max_tokens=8,
                temperature=0,
            )
            deadline = time.monotonic() + 20
            while c.load("decode").num_used_tokens == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            start = time.monotonic()
            c.kill("prefill")
            with pytest.raises(openai.APIStatusError) as e:
                fut.result()
        assert time.monotonic() - start < 15
        assert e.value.status_code == 503
        # Either the decode's failed hand-off or the prefill call itself names the prefill (the
        # orchestrator retried the request first, and had no other prefill to retry on).
        assert "KV hand-off from prefill" in str(e.value) or "prefill worker" in str(e.value)
        load = c.load("decode")
        assert load.num_used_tokens == 0 and load.num_total_reqs == 0
    finally:
        c.stop()


def test_disconnect_before_first_token_releases_slot_and_kv(ds_dir):
    """A client gone during a slow prefill: its admission slot and both workers' KV come back."""
    c = LocalCluster()
    try:
        p = c.worker("prefill", "prefill", ds_dir, "--max-prefill-tokens", "4")
        d = c.worker("decode", "decode", ds_dir)
        url = c.orchestrator(ds_dir, [p], [d], "--max-concurrency", "1")
        body = {
            "model": model_name(ds_dir),
            "prompt": [i % 400 + 5 for i in range(1800)],
            "max_tokens": 1500,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.Client(timeout=30) as http, contextlib.suppress(httpx.TimeoutException):
            http.post(f"{url}/v1/completions", json=body, timeout=0.3)  # gives up mid-prefill
        start = time.monotonic()
        c.assert_idle(timeout=10)
        assert time.monotonic() - start < 1.5  # at once, not after the whole prefill
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        res = client.completions.create(model=model_name(ds_dir), prompt="hi", max_tokens=2, temperature=0)
        assert res.choices[0].finish_reason in ("stop", "length")  # the one slot is free again, no 429
    finally:
        c.stop()
