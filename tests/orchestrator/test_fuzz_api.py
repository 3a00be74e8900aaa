"""Property-based fuzzing of the HTTP API (issue 27) with `hypothesis`: the real app (its lifespan,
registry, router and dispatch) in front of two fake workers over real gRPC
(`tests/doubles/fake_worker.py`), driven with OpenAI-shaped bodies whose every field may be wild
(wrong types, huge or negative numbers, NaN, deep or odd structures) and with arbitrary JSON.

Properties: no 5xx; every 4xx is OpenAI's error object; no request changes a breaker (a request
the worker refuses as invalid is the client's 400, sent once, never retried nor charged).
Derandomized, so a run is repeatable; the examples are bounded to keep it within seconds.
"""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.config import ApiConfig
from orchestrator.fleet.membership import create as create_membership
from orchestrator.fleet.registry import Registry, State
from orchestrator.http.app import create_app
from orchestrator.http.tokenizer import Tokenizer
from tests.doubles.fake_worker import REFUSED_TOP_K, FakeWorker

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


class Served:
    """The app with its lifespan running on a loop of its own, and the fake workers it routes to."""

    def __init__(self, ds_dir):
        vocab = Tokenizer(ds_dir).model_vocab_size
        self.prefill, self.decode = FakeWorker("prefill", vocab), FakeWorker("decode", vocab)
        config = ApiConfig(ds_dir, "tiny", frozenset({KEY}), max_concurrency=64, max_body_bytes=1 << 16)
        self.statuses: collections.Counter[int] = collections.Counter()
        self.registry = Registry()
        membership = create_membership(
            "static", self.registry, prefill=[f"grpc://{self.prefill.address}", "8998"],
            decode=[self.decode.address],
        )  # fmt: skip
        self.app = create_app(config, self.registry, membership)
        self.loop = asyncio.new_event_loop()
        self.lifespan = self.app.router.lifespan_context(self.app)
        self.loop.run_until_complete(self.lifespan.__aenter__())
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        self.http = httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30)
        self.run(self._ready())

    async def _ready(self) -> None:
        for _ in range(200):
            if all(i.state == State.READY for i in self.registry.all) and len(self.registry.all) == 2:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"fake workers not ready: {[i.describe() for i in self.registry.all]}")

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def post(self, path: str, body: bytes) -> httpx.Response:
        headers = {**AUTH, "content-type": "application/json"}
        r = self.run(self.http.post(path, content=body, headers=headers))
        self.statuses[r.status_code] += 1
        return r

    def breakers(self) -> list[tuple[str, int, int]]:
        return [(i.breaker.state.value, i.breaker.failures, i.breaker.opened) for i in self.registry.all]

    def close(self) -> None:
        self.run(self.http.aclose())
        self.run(self.lifespan.__aexit__(None, None, None))
        self.loop.close()
        self.prefill.stop()
        self.decode.stop()


@pytest.fixture(scope="module")
def served(ds_dir):
    s = Served(ds_dir)
    yield s
    s.close()


def check(served: Served, r: httpx.Response, stream: Any) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    elif stream is True:
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]
    assert served.breakers() == [("closed", 0, 0)] * 2


EDGES = [2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -1, -(2**31) - 1, -(2**63) - 1, 10**400]
"""Integers at the widths a protocol carries (int32, uint32, a double's mantissa, int64) and past."""
WILD = st.one_of(
    st.none(), st.booleans(), st.text(max_size=8), st.sampled_from(EDGES),
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-5, 5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
"""Any JSON value a careless or hostile client might put in a field."""


def bodies(wild_one_in: int) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    """Chat and completion bodies whose every field is a plausible value, or anything at all one
    time in `wild_one_in`: 20 gives mostly plausible bodies, which reach the workers; 2 gives
    mostly hostile ones, which probe the edge."""

    def field(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        # (hypothesis leans to a strategy's first choices: the plausible value comes first)
        rolls = st.sampled_from([*["good"] * (wild_one_in - 1), "wild"])
        return rolls.flatmap(lambda roll: WILD if roll == "wild" else good)

    sampling = {
        "max_tokens": field(st.integers(1, 8)),
        "temperature": field(st.floats(0, 2)),
        "top_p": field(st.floats(0.01, 1)),
        "top_k": field(st.sampled_from([-1, 0, 1, 40, REFUSED_TOP_K])),
        "min_p": field(st.floats(0, 1)),
        "seed": field(st.integers(-(2**63), 2**63 - 1)),
        "stop": field(st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=5))),
        "stream": field(st.booleans()),
        "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
        "n": field(st.just(1)),
        "ignore_eos": field(st.booleans()),
    }
    part = st.fixed_dictionaries({"type": field(st.just("text")), "text": field(st.text(max_size=12))})
    message = st.fixed_dictionaries(
        {
            "role": field(st.sampled_from(["system", "user", "assistant"])),
            "content": field(st.one_of(st.text(max_size=20), st.lists(part, max_size=2))),
        }
    )
    chat = st.fixed_dictionaries(
        {"model": field(st.just("tiny")), "messages": field(st.lists(message, min_size=1, max_size=3))},
        optional={**sampling, "logprobs": field(st.booleans()), "top_logprobs": field(st.integers(0, 5))},
    )
    prompt = st.one_of(st.text(min_size=1, max_size=20), st.lists(st.integers(0, 500), min_size=1))
    completion = st.fixed_dictionaries(
        {"model": field(st.just("tiny")), "prompt": field(prompt)},
        optional={**sampling, "echo": field(st.booleans()), "logprobs": field(st.integers(0, 5))},
    )
    return chat, completion


FIELDS = (
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "seed", "stop", "stream", "stream_options", "n", "ignore_eos", "logprobs", "top_logprobs",
    "echo", "skip_special_tokens",
)  # fmt: skip
PLAUSIBLE = bodies(20)
PATHS = ("/v1/chat/completions", "/v1/completions")


def encode(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode()  # NaN and Infinity, as Python's parser takes them


@FUZZ
@given(data=st.data(), kind=st.sampled_from([0, 1]))
def test_plausible_bodies_never_make_a_5xx_nor_move_a_breaker(served, data, kind):
    body = data.draw(PLAUSIBLE[kind])
    check(served, served.post(PATHS[kind], encode(body)), body.get("stream"))


@pytest.mark.parametrize("name", FIELDS)
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data(), kind=st.sampled_from([0, 1]), value=WILD)
def test_one_field_set_to_anything_never_makes_a_5xx(served, name, data, kind, value):
    """A plausible body with one field set to anything: what finds a gap in the edge's checks,
    which a body with several bad fields hides behind the first refusal."""
    body = {**data.draw(PLAUSIBLE[kind]), name: value}
    check(served, served.post(PATHS[kind], encode(body)), body.get("stream"))


ODD = [None, True, False, "1", "", 1.5, -0.0, float("nan"), float("inf"), [], [1], {}, {"a": 1}, *EDGES]
"""Every field is also tried at each of these, in a fixed grid (a property run may miss one)."""
MINIMAL = ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
           {"model": "tiny", "prompt": "hi", "max_tokens": 2})  # fmt: skip


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_at_every_odd_value_never_makes_a_5xx(served, name):
    for kind, base in enumerate(MINIMAL):
        for value in ODD:
            body = {**base, name: value}
            check(served, served.post(PATHS[kind], encode(body)), body.get("stream"))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(body=JSON, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_any_json_at_all_gets_an_openai_answer(served, body, path):
    check(served, served.post(path, encode(body)), None)


def test_a_request_the_worker_refuses_is_the_client_s_400_sent_once(served):
    body = {"model": "tiny", "prompt": "refuse me", "max_tokens": 2, "top_k": REFUSED_TOP_K}
    for _ in range(4):
        r = served.post("/v1/completions", encode(body))
        assert r.status_code == 400 and f"top_k={REFUSED_TOP_K}" in r.json()["error"]["message"], r.text
        rid = r.headers["x-request-id"]
        sent = [w.generates[rid] for w in (served.prefill, served.decode)]
        assert sum(sent) >= 1 and max(sent) == 1, sent  # at most once to each worker
        retries = [
            k for w in (served.prefill, served.decode) for k in w.generates if k.startswith(f"{rid}-r")
        ]
        assert not retries  # never retried
    assert served.breakers() == [("closed", 0, 0)] * 2


def test_the_fuzzing_reached_the_workers_as_well_as_the_validation(served):
    """(Runs after the properties.) The bodies are not all refused at the edge: a good share were
    served end to end, so the properties held on the dispatch path too."""
    served_ok, refused = (
        served.statuses[200],
        sum(n for code, n in served.statuses.items() if 400 <= code < 500),
    )
    assert served_ok >= 50 and refused >= 100, dict(served.statuses)
    assert sum(served.decode.generates.values()) >= served_ok
