"""Request parsing and the OpenAI → SGLang conversion, for both endpoints."""

from __future__ import annotations

import json

import pytest

from orchestrator.errors import ApiError
from orchestrator.http.openai_types import ChatCompletionRequest, CompletionRequest
from orchestrator.http.parsing import SamplingDefaults, parse_request, prompt_ids, sampling_params

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}]}


def body(**fields) -> bytes:
    return json.dumps({**CHAT, **fields}).encode()


def api_error(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args)
    return e.value


def test_chat_body_parses_to_prompt_and_sampling(config, tokenizer):
    req = parse_request(body(temperature=0.5, top_p=0.9, top_k=5, max_tokens=7), "chat", config)
    assert isinstance(req, ChatCompletionRequest)
    ids = prompt_ids(req, tokenizer)
    assert ids == tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}])
    sp = sampling_params(req, len(ids), 4096)
    assert (sp.max_new_tokens, sp.top_k, sp.n, sp.skip_special_tokens) == (7, 5, 1, True)
    assert sp.temperature == pytest.approx(0.5) and sp.top_p == pytest.approx(0.9)
    assert not sp.HasField("custom_params")


def test_completion_body_takes_text_or_token_ids(config, tokenizer):
    text = parse_request(b'{"model": "tiny", "prompt": "The KV cache"}', "completion", config)
    assert isinstance(text, CompletionRequest)
    assert prompt_ids(text, tokenizer) == tokenizer.encode("The KV cache")
    ids = parse_request(b'{"model": "tiny", "prompt": [[5, 6, 7]]}', "completion", config)
    assert prompt_ids(ids, tokenizer) == [5, 6, 7]  # one prompt in a batch of one is accepted


def test_model_directory_path_is_also_accepted(config):
    req = parse_request(json.dumps({**CHAT, "model": str(config.model_dir)}).encode(), "chat", config)
    assert req.model == str(config.model_dir)


@pytest.mark.parametrize(
    "raw, kind, status, fragment, param",
    [
        (b"{not json", "chat", 400, "not valid JSON", None),
        (b"\xff\xfe", "chat", 400, "not valid JSON", None),
        (b"[1, 2]", "chat", 400, "must be a JSON object", None),
        (b'{"model": "tiny"}', "chat", 400, "messages", "messages"),
        (body(model="nope"), "chat", 404, "does not exist", "model"),
        (body(max_tokens=-1), "chat", 400, "max_tokens", "max_tokens"),
        (body(top_p=1.5), "chat", 400, "top_p", "top_p"),
        (body(temperature=-1), "chat", 400, "temperature", "temperature"),
        (body(n=2), "chat", 400, "n", "n"),
        (body(stop=["a", "b", "c", "d", "e"]), "chat", 400, "at most 4 stop", "stop"),
        (body(messages=[{"role": "robot", "content": "x"}]), "chat", 400, "role", "messages.0.role"),
        (b'{"model": "tiny", "prompt": ["a", "b"]}', "completion", 400, "batched prompts", "prompt"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": 0}', "completion", 400, "max_tokens", "max_tokens"),
        (b'{"model": "tiny", "prompt": "' + b"x" * (1 << 20) + b'"}', "completion", 413, "over", None),
    ],
)
def test_bad_bodies_get_clear_errors(config, raw, kind, status, fragment, param):
    err = api_error(parse_request, raw, kind, config)
    assert err.status == status
    assert fragment in str(err)
    assert err.param == param
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_unknown_model_names_the_served_one(config):
    err = api_error(parse_request, body(model="gpt-4"), "chat", config)
    assert err.code == "model_not_found" and "'tiny'" in str(err)


def test_non_text_content_parts_are_refused(config, tokenizer):
    req = parse_request(
        body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        "chat",
        config,
    )
    err = api_error(prompt_ids, req, tokenizer)
    assert err.status == 400 and err.param == "messages" and "send text" in str(err)


def test_text_content_parts_are_joined(config, tokenizer):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    req = parse_request(body(messages=[{"role": "user", "content": parts}]), "chat", config)
    assert prompt_ids(req, tokenizer) == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}]
    )


def test_max_tokens_defaults_to_the_rest_of_the_context(config):
    req = parse_request(body(), "chat", config)
    assert sampling_params(req, 100, 4096).max_new_tokens == 3996


def test_max_completion_tokens_overrides_max_tokens(config):
    req = parse_request(body(max_tokens=50, max_completion_tokens=9), "chat", config)
    assert sampling_params(req, 10, 4096).max_new_tokens == 9


def test_prompt_at_the_context_limit_is_refused(config):
    err = api_error(sampling_params, parse_request(body(), "chat", config), 4096, 4096)
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "messages")
    assert "context is 4096 tokens" in str(err)


def test_prompt_plus_max_tokens_over_the_context_is_refused(config):
    err = api_error(sampling_params, parse_request(body(max_tokens=100), "chat", config), 4000, 4096)
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "max_tokens")
    assert "lower max_tokens" in str(err)


def test_unknown_context_limit_checks_nothing(config):
    req = parse_request(body(max_tokens=10**6), "chat", config)
    assert sampling_params(req, 10**6, 0).max_new_tokens == 10**6


def test_seed_travels_in_custom_params_exactly(config):
    for seed in (1234, 2**63 - 1, -(2**63), 2**53 + 1):  # a double would round the last one
        sp = sampling_params(parse_request(body(seed=seed), "chat", config), 10, 4096)
        assert sp.custom_params.fields["seed"].string_value == str(seed)


def test_stop_is_always_a_list(config):
    assert parse_request(body(stop="END"), "chat", config).stop_list == ["END"]
    assert parse_request(body(stop=["a", "b"]), "chat", config).stop_list == ["a", "b"]
    assert parse_request(body(), "chat", config).stop_list == []


def test_engine_flags_pass_through(config):
    req = parse_request(body(ignore_eos=True, skip_special_tokens=False, min_p=0.1), "chat", config)
    sp = sampling_params(req, 10, 4096)
    assert sp.ignore_eos and not sp.skip_special_tokens and sp.min_p == pytest.approx(0.1)


def test_unset_sampling_takes_the_models_generation_config(config, tmp_path):
    """DeepSeek-R1's recommendation (temperature 0.6, top_p 0.95) applies where a request is silent."""
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "eos_token_id": 1})
    )
    defaults = SamplingDefaults.from_dir(tmp_path)
    sp = sampling_params(parse_request(body(), "chat", config), 10, 4096, defaults)
    assert sp.temperature == pytest.approx(0.6) and sp.top_p == pytest.approx(0.95)
    assert sp.top_k == 0 and sp.min_p == 0.0
    sp = sampling_params(parse_request(body(temperature=0, top_p=1), "chat", config), 10, 4096, defaults)
    assert sp.temperature == 0.0 and sp.top_p == 1.0  # what the request says wins
    plain = sampling_params(parse_request(body(), "chat", config), 10, 4096)
    assert plain.temperature == 1.0 and plain.top_p == 1.0  # OpenAI's defaults without a file


def test_a_bad_generation_config_is_named(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 7}))
    with pytest.raises(
        ValueError, match=r"generation_config.json: temperature=7 is not a number in \[0.0, 2.0\]"
    ):
        SamplingDefaults.from_dir(tmp_path)
