"""Bad input: a clear error, no crash, nothing queued, no page leaked."""

import pytest

from services.engine import (
    Engine,
    EngineConfigError,
    InvalidRequestError,
    SamplingParams,
    SamplingParamsError,
)


@pytest.fixture(scope="module")
def engine(ds_dir):
    return Engine.from_pretrained(ds_dir, max_model_len=64)


def assert_clean(engine):
    assert not engine.has_unfinished()
    assert engine.kv_stats().used_pages == 0


def test_prompt_over_context(engine):
    with pytest.raises(InvalidRequestError, match="prompt has 64 tokens but the context limit is 64"):
        engine.add_request([1] * 64)
    assert_clean(engine)


def test_empty_prompt(engine):
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.generate([[]])
    assert_clean(engine)


def test_token_out_of_vocab(engine):
    with pytest.raises(InvalidRequestError, match=r"integers in \[0, 512\)"):
        engine.add_request([1, 512])
    assert_clean(engine)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
        ({"max_tokens": -3}, "max_tokens must be an integer >= 1, got -3"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"temperature": -1.0}, "temperature must be in"),
        ({"top_k": -2}, "top_k must be"),
        ({"min_p": 2.0}, "min_p must be"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(SamplingParamsError, match=message):
        SamplingParams(**kwargs)


def test_one_bad_prompt_queues_nothing(engine):
    with pytest.raises(InvalidRequestError):
        engine.generate([[1, 2, 3], [], [4]], SamplingParams(max_tokens=2))
    assert_clean(engine)


def test_generation_stops_at_context_limit(engine):
    (out,) = engine.generate([[1] * 60], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.output_token_ids) == 4
    assert_clean(engine)


def test_duplicate_request_id(engine):
    engine.add_request([1, 2], request_id="x")
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request([1, 2], request_id="x")
    engine.abort("x")
    assert_clean(engine)


def test_bad_engine_options(ds_dir):
    with pytest.raises(EngineConfigError, match="unknown engine option"):
        Engine.from_pretrained(ds_dir, pagesize=16)
    with pytest.raises(EngineConfigError, match="dtype must be one of"):
        Engine.from_pretrained(ds_dir, dtype="int3")
    with pytest.raises(EngineConfigError, match="not both"):
        Engine.from_pretrained(ds_dir, kv_pool_tokens=10, kv_pool_bytes=10)
