"""Token events → text events: incremental detokenization, then stop strings."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from orchestrator.events import TokenEvent
from orchestrator.http.logprobs import ShownLogprob, Speller
from orchestrator.http.tokenizer import ChatTokenizer, IncrementalDetokenizer, StopStrings


@dataclass(frozen=True)
class TextEvent:
    """Text the client may see now; the last event carries the finish reason and the token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: tuple[ShownLogprob, ...] = ()
    """Those of the tokens this event consumed, when the request asked for log-probabilities."""


async def text_events(
    tokens: AsyncGenerator[TokenEvent, None],
    tokenizer: ChatTokenizer,
    stop: list[str],
    skip_special_tokens: bool = True,
) -> AsyncGenerator[TextEvent, None]:
    """The text of `tokens`, cut before the first stop string (which ends the request with "stop").

    Closing this stream closes `tokens`, which cancels the request on the workers.
    """
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    stops = StopStrings(stop)
    speller = Speller(lambda t: tokenizer.decode([t], skip_special_tokens=False))
    try:
        async for ev in tokens:
            final = ev.finish_reason is not None
            text = stops.feed(detok.add(ev.token_ids) + (detok.flush() if final else ""), final=final)
            rest = (ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens, speller.show(ev.logprobs))
            if stops.matched is not None:
                yield TextEvent(text, "stop", *rest)
                return  # closing the token stream aborts the request on both workers
            yield TextEvent(text, ev.finish_reason, *rest)
    finally:
        await tokens.aclose()
