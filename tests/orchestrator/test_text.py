"""Token events → text events: the streamed text adds up, and stop strings cut it and end the request."""

from __future__ import annotations

import asyncio

from orchestrator.events import TokenEvent
from orchestrator.http.detokenize import TextEvent, text_events
from tests.orchestrator.conftest import TokenSource, token_events

TEXT = "The KV cache moves from the prefill worker to the decode worker. Done."


def run(tokenizer, source: TokenSource, stop: list[str]) -> list[TextEvent]:
    async def main() -> list[TextEvent]:
        return [ev async for ev in text_events(source.stream(), tokenizer, stop)]

    return asyncio.run(main())


def test_text_adds_up_and_the_last_event_finishes(tokenizer):
    source = TokenSource(token_events(tokenizer, TEXT, "length"))
    events = run(tokenizer, source, [])
    assert "".join(ev.text for ev in events) == TEXT
    assert [ev.finish_reason for ev in events if ev.finish_reason] == ["length"]
    last = events[-1]
    assert (last.prompt_tokens, last.completion_tokens, last.cached_tokens) == (3, len(events) - 1, 1)


def test_stop_string_trims_the_text_and_closes_the_token_stream(tokenizer):
    source = TokenSource(token_events(tokenizer, TEXT, "length"), hang=True)
    events = run(tokenizer, source, ["decode worker", "never"])
    assert "".join(ev.text for ev in events) == "The KV cache moves from the prefill worker to the "
    assert events[-1].finish_reason == "stop"
    assert all(ev.finish_reason is None for ev in events[:-1])
    assert source.closed  # closing the token stream is what cancels the request on the workers


def test_stop_string_split_across_tokens_is_held_back(tokenizer):
    events = token_events(tokenizer, "abc STOP def", None)
    assert len(events) > 6  # "STOP" arrives over several events
    source = TokenSource(events, hang=True)
    texts = [ev.text for ev in run(tokenizer, source, ["STOP"])]
    assert "".join(texts) == "abc "  # nothing of "STOP" was shown, not even its first letters
    assert source.closed


def test_stop_string_in_the_last_event_still_finishes_with_stop(tokenizer):
    ids = tokenizer.encode("one two three", add_special_tokens=False)
    source = TokenSource([TokenEvent(ids, "length", 2, len(ids))])
    events = run(tokenizer, source, ["three"])
    assert [(ev.text, ev.finish_reason) for ev in events] == [("one two ", "stop")]


def test_special_tokens_are_skipped_unless_asked(tokenizer):
    eos = tokenizer.encode(tokenizer.eos_token, add_special_tokens=False)
    ids = tokenizer.encode("hi", add_special_tokens=False) + eos

    async def text(skip: bool) -> str:
        source = TokenSource([TokenEvent(ids, "stop")])
        return "".join([ev.text async for ev in text_events(source.stream(), tokenizer, [], skip)])

    assert asyncio.run(text(True)) == "hi"
    assert asyncio.run(text(False)) == "hi" + tokenizer.eos_token
