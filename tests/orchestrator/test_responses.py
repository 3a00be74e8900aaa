"""Text events as HTTP responses: the stream's lines, the JSON body, and how each ends and cleans up."""

from __future__ import annotations

import asyncio
import json

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from orchestrator.errors import ApiError
from orchestrator.http.admission import Admission
from orchestrator.http.detokenize import text_events
from orchestrator.http.envelopes import DONE, Envelope
from orchestrator.http.openai_types import ChatCompletionRequest, CompletionRequest
from orchestrator.http.responses import respond
from tests.orchestrator.conftest import TokenSource, token_events

MESSAGES = [{"role": "user", "content": "x"}]


def chat(stream: bool) -> Envelope:
    req = ChatCompletionRequest(
        model="tiny", messages=MESSAGES, stream=stream, stream_options={"include_usage": True}
    )
    return Envelope.for_request("chat", req, "tiny")


def payloads(lines: list[str]) -> list:
    """The data of each event: parsed JSON, or the "[DONE]" marker."""
    assert all(line.startswith("data: ") and line.endswith("\n\n") for line in lines)
    return [line[6:-2] if line == DONE else json.loads(line[6:]) for line in lines]


def split_events(pieces: list[str]) -> list[str]:
    """The stream's events (a piece of the body may carry several), each ending in a blank line."""
    assert all(piece.endswith("\n\n") for piece in pieces)
    return [event + "\n\n" for event in "".join(pieces).split("\n\n")[:-1]]


async def body_lines(response: StreamingResponse) -> list[str]:
    pieces = [piece async for piece in response.body_iterator]
    await response.background()  # what the response runs after the body
    return split_events(pieces)


def test_stream_sends_role_text_finish_usage_then_done(tokenizer):
    async def main():
        admission = Admission(1)
        slot = admission.admit()
        source = TokenSource(token_events(tokenizer, "Hello there", "stop"))
        events = text_events(source.stream(), tokenizer, [])
        response = await respond(chat(True), True, events, slot, admission)
        assert isinstance(response, StreamingResponse)
        lines = await body_lines(response)
        return admission, source, payloads(lines)

    admission, source, events = asyncio.run(main())
    deltas = [e["choices"][0]["delta"] for e in events[:-2]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d["content"] for d in deltas) == "Hello there"
    assert [e["choices"][0]["finish_reason"] for e in events[:-2]][-1] == "stop"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 1
    }
    assert events[-1] == "[DONE]"
    assert admission.in_flight == 0 and source.closed


def test_json_response_collects_the_text_and_releases_the_slot(tokenizer):
    async def main():
        admission = Admission(1)
        slot = admission.admit()
        source = TokenSource(token_events(tokenizer, "Hello there", "length"))
        events = text_events(source.stream(), tokenizer, [])
        response = await respond(chat(False), False, events, slot, admission)
        return admission, response

    admission, response = asyncio.run(main())
    assert isinstance(response, JSONResponse) and response.status_code == 200
    body = json.loads(response.body)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello there"}
    n = len(tokenizer.encode("Hello there", add_special_tokens=False))
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == n
    assert admission.in_flight == 0


def test_no_output_is_a_502_and_frees_the_slot(tokenizer):
    async def main():
        admission = Admission(1)
        slot = admission.admit()
        events = text_events(TokenSource([]).stream(), tokenizer, [])
        try:
            await respond(chat(True), True, events, slot, admission)
        except ApiError as e:
            return admission, e

    admission, err = asyncio.run(main())
    assert err.status == 502 and err.type == "upstream_error"
    assert admission.in_flight == 0


def test_a_stream_never_started_still_frees_the_slot_and_cancels(tokenizer):
    """The client left before the body started: only the background task runs, once."""

    async def main():
        admission = Admission(1)
        slot = admission.admit()
        source = TokenSource(token_events(tokenizer, "Hello there", None), hang=True)
        events = text_events(source.stream(), tokenizer, [])
        response = await respond(chat(True), True, events, slot, admission)
        await response.background()
        await response.background()
        return admission, source

    admission, source = asyncio.run(main())
    assert admission.in_flight == 0 and source.closed


def test_shutdown_ends_a_running_stream_with_an_error_event_and_done(tokenizer):
    async def main():
        admission = Admission(2)
        slot = admission.admit()
        tokens = token_events(tokenizer, "Hello there", None)
        source = TokenSource(tokens, hang=True)
        events = text_events(source.stream(), tokenizer, [])
        response = await respond(chat(True), True, events, slot, admission)
        body = response.body_iterator
        lines = [await anext(body) for _ in tokens]  # a piece a token (the role comes with the first)
        pending = asyncio.ensure_future(anext(body))
        await asyncio.sleep(0.01)
        assert not pending.done()  # waiting for a token that never comes
        admission.close()
        lines.append(await asyncio.wait_for(pending, 1.0))
        lines += [line async for line in body]
        await response.background()
        return admission, source, payloads(split_events(lines))

    admission, source, events = asyncio.run(main())
    assert "".join(e["choices"][0]["delta"]["content"] for e in events[:-2]) == "Hello there"
    assert events[-2]["error"]["type"] == "service_unavailable"
    assert "shutting down" in events[-2]["error"]["message"]
    assert events[-1] == "[DONE]"
    assert source.closed and admission.in_flight == 0


def test_shutdown_before_the_first_token_is_a_503(tokenizer):
    async def main():
        admission = Admission(2)
        slot = admission.admit()
        source = TokenSource([], hang=True)
        events = text_events(source.stream(), tokenizer, [])
        req = CompletionRequest(model="tiny", prompt="x")
        answer = asyncio.ensure_future(
            respond(Envelope.for_request("completion", req, "tiny"), False, events, slot, admission)
        )
        await asyncio.sleep(0.01)
        admission.close()
        try:
            await asyncio.wait_for(answer, 1.0)
        except ApiError as e:
            return admission, source, e

    admission, source, err = asyncio.run(main())
    assert err.status == 503 and err.code == "server_shutting_down"
    assert source.closed and admission.in_flight == 0


def test_a_worker_error_mid_stream_becomes_an_error_event(tokenizer):
    async def failing():
        for ev in token_events(tokenizer, "Hi", None):
            yield ev
        raise ApiError(503, "decode worker x failed (UNAVAILABLE): gone", "service_unavailable")

    async def main():
        admission = Admission(1)
        slot = admission.admit()
        events = text_events(failing(), tokenizer, [])
        response = await respond(chat(True), True, events, slot, admission)
        return admission, payloads(await body_lines(response))

    admission, events = asyncio.run(main())
    assert events[-2]["error"]["message"].startswith("decode worker x failed")
    assert events[-1] == "[DONE]" and admission.in_flight == 0


class Client:
    """The ASGI side of one connection: what the response sends, and a disconnect when told."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.leave = asyncio.Event()

    async def receive(self) -> dict:
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    def request(self) -> Request:
        return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []},
                       self.receive)  # fmt: skip


def test_event_stream_over_asgi_sends_pieces_and_ends_with_done(tokenizer):
    async def main():
        admission, client = Admission(1), Client()
        source = TokenSource(token_events(tokenizer, "Hello there", "length"))
        events = text_events(source.stream(), tokenizer, [])
        response = await respond(chat(True), True, events, admission.admit(), admission, client.request())
        await response({"type": "http"}, client.receive, client.send)
        return admission, client.sent

    admission, sent = asyncio.run(main())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    bodies = [m for m in sent[1:] if m["type"] == "http.response.body"]
    assert [m["more_body"] for m in bodies] == [True] * (len(bodies) - 1) + [False]
    text = b"".join(m["body"] for m in bodies).decode()
    events = payloads(split_events([text]))
    assert "".join(e["choices"][0]["delta"]["content"] for e in events[:-2]) == "Hello there"
    assert bodies[-1]["body"].endswith(DONE.encode()) and admission.in_flight == 0


def test_a_client_leaving_mid_stream_or_before_the_first_token_ends_the_request(tokenizer):
    async def main():
        admission, client = Admission(2), Client()
        source = TokenSource(token_events(tokenizer, "Hello there", None), hang=True)
        events = text_events(source.stream(), tokenizer, [])
        response = await respond(chat(True), True, events, admission.admit(), admission, client.request())
        streaming = asyncio.ensure_future(response({"type": "http"}, client.receive, client.send))
        await asyncio.sleep(0.01)
        assert not streaming.done() and len(client.sent) > 1  # the text so far went out; it waits
        client.leave.set()
        await asyncio.wait_for(streaming, 1.0)  # ends at once, without an error
        mid_stream = (source.closed, client.sent[-1].get("more_body"))

        early, waiting = Client(), TokenSource([], hang=True)
        events = text_events(waiting.stream(), tokenizer, [])
        answer = asyncio.ensure_future(
            respond(chat(True), True, events, admission.admit(), admission, early.request())
        )
        await asyncio.sleep(0.01)
        early.leave.set()
        gone = await asyncio.wait_for(answer, 1.0)
        return admission, mid_stream, waiting.closed, gone.status_code

    admission, (closed, more), early_closed, status = asyncio.run(main())
    assert closed and more is True  # cancelled on the workers; the body was never completed
    assert early_closed and status == 499 and admission.in_flight == 0
