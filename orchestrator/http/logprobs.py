"""Log-probabilities: from SGLang's `OutputLogProbs` to OpenAI's two shapes.

Chat (`logprobs: true`, `top_logprobs: k`) answers `{"content": [{token, logprob, bytes,
top_logprobs: [...]}]}`; completions (`logprobs: k`) answer the legacy columns `tokens`,
`token_logprobs`, `top_logprobs` (one dict per token) and `text_offset`. The values are the
model's own distribution (before temperature and filters), as OpenAI and vLLM report them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.events import TokenLogprob


@dataclass(frozen=True)
class ShownLogprob:
    """A token's log-probability with the tokens spelled out, and where its text starts."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]
    offset: int
    """Characters of generated text before this token's."""


class Speller:
    """Spells out the tokens of one response and keeps count of the characters before each."""

    def __init__(self, spell: Callable[[int], str]):
        self.spell = spell
        self.offset = 0

    def show(self, lps: tuple[TokenLogprob, ...]) -> tuple[ShownLogprob, ...]:
        shown = []
        for lp in lps:
            token = self.spell(lp.token_id)
            top = tuple((self.spell(t), v) for t, v in lp.top)
            shown.append(ShownLogprob(token, lp.logprob, top, self.offset))
            self.offset += len(token)
        return tuple(shown)


def chat_logprobs(shown: tuple[ShownLogprob, ...]) -> dict[str, Any]:
    """OpenAI chat's `choices[].logprobs`."""

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(s.token, s.logprob), "top_logprobs": [entry(t, v) for t, v in s.top]} for s in shown
        ],
        "refusal": None,
    }


def completion_logprobs(shown: tuple[ShownLogprob, ...], text_start: int = 0) -> dict[str, Any]:
    """OpenAI completions' `choices[].logprobs`; offsets count from `text_start` (the echoed prompt)."""
    return {
        "tokens": [s.token for s in shown],
        "token_logprobs": [s.logprob for s in shown],
        "top_logprobs": [dict(s.top) for s in shown],
        "text_offset": [text_start + s.offset for s in shown],
    }
