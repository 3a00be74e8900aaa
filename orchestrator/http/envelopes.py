"""OpenAI response shapes: one builder for chat and completion, streamed chunk, final body and usage."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import ApiError
from orchestrator.http.detokenize import TextEvent
from orchestrator.http.logprobs import ShownLogprob, chat_logprobs, completion_logprobs
from orchestrator.http.openai_types import CompletionRequest, Kind, OpenAIRequest

DONE = "data: [DONE]\n\n"
"""The last line of every stream."""


def sse(body: dict[str, Any]) -> str:
    """One server-sent event carrying `body` as JSON."""
    return f"data: {json.dumps(body)}\n\n"


def usage(ev: TextEvent) -> dict[str, Any]:
    return {
        "prompt_tokens": ev.prompt_tokens,
        "completion_tokens": ev.completion_tokens,
        "total_tokens": ev.prompt_tokens + ev.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": ev.cached_tokens},
    }


@dataclass(frozen=True)
class Envelope:
    """The response of one request: its id, model and kind, wrapped around text as OpenAI shapes it."""

    kind: Kind
    id: str
    model: str
    created: int
    stream_usage: bool = False
    """The client asked for a usage chunk at the end of the stream (`stream_options.include_usage`)."""
    echo: str = ""
    """The prompt's text, put before the completion's (`echo`): first in a stream, else in the body."""
    logprobs: bool = False
    """The client asked for log-probabilities (each choice carries them; otherwise null)."""

    @classmethod
    def for_request(
        cls, kind: Kind, req: OpenAIRequest, model: str, request_id: str = "", prompt_text: str = ""
    ) -> Envelope:
        """The response's id is `chatcmpl-`/`cmpl-` and `request_id` (default: a fresh one);
        `prompt_text` is the prompt as text (echoed when a completion asks for `echo`)."""
        echo = prompt_text if isinstance(req, CompletionRequest) and req.echo else ""
        return cls(
            kind,
            f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id or uuid.uuid4().hex[:24]}",
            model,
            int(time.time()),
            req.stream_options is not None and req.stream_options.include_usage,
            echo,
            req.logprob_count is not None,
        )

    def opening(self) -> list[str]:
        """The events a stream starts with: for chat, the assistant's role before any content; for an
        echoing completion, the prompt."""
        if self.kind == "chat":
            return [sse(self._body(True, self._choice(True, "", None, (), role=True)))]
        return [sse(self._body(True, self._choice(True, self.echo, None, ())))] if self.echo else []

    def chunk(self, ev: TextEvent) -> str:
        """A streamed event: new text, its tokens' log-probabilities, and at the end the finish reason."""
        return sse(self._body(True, self._choice(True, ev.text, ev.finish_reason, ev.logprobs)))

    def final(self, text: str, last: TextEvent, logprobs: tuple[ShownLogprob, ...] = ()) -> dict[str, Any]:
        """The whole (non-streamed) response: all the text, the finish reason, `logprobs` and usage."""
        return self._body(False, self._choice(False, text, last.finish_reason, logprobs), usage(last))

    def usage_chunk(self, last: TextEvent) -> str:
        """The stream's closing usage event (no choices), sent when the client asked for it."""
        return sse(self._body(True, None, usage(last)))

    def _body(
        self, stream: bool, choice: dict[str, Any] | None, use: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if stream else "chat.completion"
        else:
            obj = "text_completion"
        body: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [] if choice is None else [choice],
        }
        if use is not None or (stream and self.stream_usage):
            body["usage"] = use  # null on content chunks, as OpenAI sends them
        return body

    def _choice(
        self,
        stream: bool,
        text: str,
        finish: str | None,
        logprobs: tuple[ShownLogprob, ...],
        role: bool = False,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.logprobs and not role:  # (echo with logprobs is refused at parsing)
            if self.kind == "chat":
                choice["logprobs"] = chat_logprobs(logprobs)
            else:
                choice["logprobs"] = completion_logprobs(logprobs, len(self.echo))
        if self.kind == "completion":
            choice["text"] = text if stream else self.echo + text
        elif stream:
            choice["delta"] = {"role": "assistant", "content": text} if role else {"content": text}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return choice


def error_event(err: ApiError) -> str:
    """A stream's error event (the HTTP status was already sent)."""
    return sse(err.body())
