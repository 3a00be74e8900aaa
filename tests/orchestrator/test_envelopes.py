"""Response shapes for chat and completion, streamed and not, read back with the `openai` client."""

from __future__ import annotations

import json

import httpx2
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from orchestrator.errors import ApiError
from orchestrator.http.detokenize import TextEvent
from orchestrator.http.envelopes import DONE, Envelope, error_event
from orchestrator.http.logprobs import ShownLogprob
from orchestrator.http.openai_types import ChatCompletionRequest, CompletionRequest

LAST = TextEvent("", "stop", prompt_tokens=5, completion_tokens=3, cached_tokens=2)
USAGE = {
    "prompt_tokens": 5,
    "completion_tokens": 3,
    "total_tokens": 8,
    "prompt_tokens_details": {"cached_tokens": 2},
}


def chat(**fields) -> Envelope:
    req = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}], **fields)
    return Envelope.for_request("chat", req, "tiny")


def completion(**fields) -> Envelope:
    req = CompletionRequest(model="tiny", prompt="Hi", **fields)
    return Envelope.for_request("completion", req, "tiny", prompt_text="Hi")


def read_stream(sse: str, cast_to: type) -> list:
    """What the `openai` client makes of a streamed body (strict validation of every chunk)."""
    client = openai.OpenAI(api_key="x", base_url="http://unused.invalid/v1", _strict_response_validation=True)
    request = httpx2.Request("POST", "http://unused.invalid/v1/x")
    response = httpx2.Response(200, content=sse.encode(), request=request)
    return list(openai.Stream(cast_to=cast_to, response=response, client=client))


def data(line: str) -> dict:
    assert line.startswith("data: ") and line.endswith("\n\n")
    return json.loads(line[6:])


def test_chat_stream_opens_with_the_role_and_ends_with_usage():
    env = chat(stream=True, stream_options={"include_usage": True})
    lines = [
        *env.opening(),
        env.chunk(TextEvent("Hel")),
        env.chunk(TextEvent("lo", "stop")),
        env.usage_chunk(LAST),
        DONE,
    ]
    assert data(lines[0])["choices"] == [
        {"index": 0, "finish_reason": None, "logprobs": None, "delta": {"role": "assistant", "content": ""}}
    ]
    assert data(lines[1])["usage"] is None  # content chunks carry a null usage when usage was asked for
    assert data(lines[3]) == {
        "id": env.id,
        "object": "chat.completion.chunk",
        "created": env.created,
        "model": "tiny",
        "choices": [],
        "usage": USAGE,
    }
    chunks = read_stream("".join(lines), ChatCompletionChunk)
    assert [c.choices[0].delta.content for c in chunks if c.choices] == ["", "Hel", "lo"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, None, "stop"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 2
    assert {c.id for c in chunks} == {env.id} and env.id.startswith("chatcmpl-")


def test_chat_stream_without_usage_has_no_usage_key():
    env = chat(stream=True)
    assert "usage" not in data(env.chunk(TextEvent("a")))
    assert "usage" not in data(env.opening()[0])


def test_chat_final_body():
    env = chat()
    body = env.final("Hello", LAST)
    assert body == {
        "id": env.id,
        "object": "chat.completion",
        "created": env.created,
        "model": "tiny",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "logprobs": None,
                "message": {"role": "assistant", "content": "Hello"},
            }
        ],
        "usage": USAGE,
    }
    res = ChatCompletion.model_validate(body)
    assert res.choices[0].message.content == "Hello" and res.usage.total_tokens == 8


def test_completion_stream_has_no_role_chunk():
    env = completion(stream=True, stream_options={"include_usage": True})
    assert env.opening() == []
    sse = "".join([env.chunk(TextEvent(" there", "length")), env.usage_chunk(LAST), DONE])
    chunks = read_stream(sse, Completion)
    assert chunks[0].choices[0].text == " there" and chunks[0].choices[0].finish_reason == "length"
    assert chunks[0].object == "text_completion" and env.id.startswith("cmpl-")
    assert chunks[1].choices == [] and chunks[1].usage.completion_tokens == 3


@pytest.mark.parametrize("echo, text", [(False, " there"), (True, "Hi there")])
def test_completion_final_body_echoes_the_prompt_if_asked(echo, text):
    env = completion(echo=echo)
    body = env.final(" there", LAST)
    assert body["choices"] == [{"index": 0, "finish_reason": "stop", "logprobs": None, "text": text}]
    assert body["usage"] == USAGE and body["object"] == "text_completion"
    assert Completion.model_validate(body).choices[0].text == text


def test_streamed_completion_echo_comes_first():
    env = completion(echo=True, stream=True)
    opening = env.opening()
    assert len(opening) == 1 and data(opening[0])["choices"][0]["text"] == "Hi"
    sse = "".join([env.chunk(TextEvent(" there", "length")), DONE])
    assert [c.choices[0].text for c in read_stream(sse, Completion)] == [" there"]


SHOWN = (
    ShownLogprob("Hel", -0.5, (("Hel", -0.5), ("He", -1.5)), 0),
    ShownLogprob("lo", -0.25, (("lo", -0.25), ("p", -2.0)), 3),
)


def test_chat_logprobs_in_chunks_and_body():
    env = chat(stream=True, logprobs=True, top_logprobs=2)
    sse = "".join([*env.opening(), env.chunk(TextEvent("Hel", None, logprobs=SHOWN[:1])), DONE])
    chunks = read_stream(sse, ChatCompletionChunk)
    assert chunks[0].choices[0].logprobs is None  # the role chunk
    content = chunks[1].choices[0].logprobs.content
    assert [(c.token, c.logprob, c.bytes) for c in content] == [("Hel", -0.5, [72, 101, 108])]
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("Hel", -0.5), ("He", -1.5)]
    body = chat(logprobs=True, top_logprobs=2).final("Hello", LAST, SHOWN)
    res = ChatCompletion.model_validate(body)
    assert [c.token for c in res.choices[0].logprobs.content] == ["Hel", "lo"]
    assert chat().final("Hello", LAST, ())["choices"][0]["logprobs"] is None


def test_completion_logprobs_are_the_legacy_columns():
    body = completion(logprobs=1).final("Hello", LAST, SHOWN)
    lp = Completion.model_validate(body).choices[0].logprobs
    assert lp.tokens == ["Hel", "lo"] and lp.token_logprobs == [-0.5, -0.25]
    assert lp.top_logprobs == [{"Hel": -0.5, "He": -1.5}, {"lo": -0.25, "p": -2.0}]
    assert lp.text_offset == [0, 3]


def test_stream_error_event_is_raised_by_the_client():
    env = chat(stream=True)
    err = ApiError(503, "going away", "service_unavailable", "server_shutting_down")
    sse = "".join([*env.opening(), error_event(err), DONE])
    assert data(error_event(err)) == {
        "error": {
            "message": "going away",
            "type": "service_unavailable",
            "param": None,
            "code": "server_shutting_down",
        }
    }
    with pytest.raises(openai.APIError, match="going away"):
        read_stream(sse, ChatCompletionChunk)
