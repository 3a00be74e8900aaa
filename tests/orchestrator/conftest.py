"""Fixtures for the orchestrator's unit tests: the tiny model's tokenizer and config, a token source."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from orchestrator.config import ApiConfig
from orchestrator.events import TokenEvent
from orchestrator.http.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer(ds_dir) -> Tokenizer:
    return Tokenizer(ds_dir)


@pytest.fixture(scope="session")
def config(ds_dir) -> ApiConfig:
    return ApiConfig(ds_dir, "tiny", max_concurrency=2)


class TokenSource:
    """Stands in for `generate`'s decode stream: yields the given events, then ends or waits forever.

    `closed` turns true when the stream is closed or cancelled, as `generate` then cancels the workers.
    """

    def __init__(self, events: list[TokenEvent], hang: bool = False):
        self.events, self.hang = events, hang
        self.closed = False

    async def stream(self) -> AsyncIterator[TokenEvent]:
        try:
            for ev in self.events:
                yield ev
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.closed = True


def token_events(tokenizer: Tokenizer, text: str, finish: str | None = "length") -> list[TokenEvent]:
    """`text` as one event per token, the last carrying `finish` and the counts."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    events = [TokenEvent([t], None, 3, i + 1) for i, t in enumerate(ids)]
    if finish is not None:
        events.append(TokenEvent([], finish, 3, len(ids), 1))
    return events
