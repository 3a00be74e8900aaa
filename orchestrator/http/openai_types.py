"""OpenAI request bodies, validated with pydantic at the HTTP edge (responses: `envelopes`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOP_LOGPROBS = 20
"""The most alternatives per token a request may ask for (`top_logprobs`, completions' `logprobs`)."""
INT32_MAX = (1 << 31) - 1
"""The largest count the workers' protocol carries (`max_new_tokens`, `top_k`)."""
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)
"""Seeds are 64-bit signed integers, as OpenAI documents them."""
STRICT = ConfigDict(strict=True, extra="allow")
"""No coercion (`"10"` is not 10, `true` is not 1, `"yes"` is not true), as OpenAI's API answers;
unknown OpenAI fields are accepted and ignored."""


class StreamOptions(BaseModel):
    """`stream_options`: whether a streamed response ends with a usage chunk."""

    model_config = STRICT

    include_usage: bool = False


UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "logit_bias": ({},),
    "best_of": (1,),
    "suffix": ("",),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
}
"""Fields accepted only with the values that ask for nothing (`tools: []`, `logprobs: false`...)."""


class _Sampling(BaseModel):
    """Fields shared by both endpoints: the model id, sampling and streaming."""

    model_config = STRICT

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    # Sampling left unset (None) takes the model's generation_config.json, else OpenAI's defaults
    # (`parsing.SamplingDefaults`).
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, raw: Any) -> Any:
        """OpenAI features this server does not offer: a clear 400, never silently ignored."""
        if not isinstance(raw, dict):
            return raw
        for field, harmless in UNSUPPORTED.items():
            value = raw.get(field)
            if value is not None and value not in harmless:
                raise ValueError(f"{field} is not supported by this server; remove it")
        return raw

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return stops

    @property
    def stop_list(self) -> list[str]:
        return self.stop if isinstance(self.stop, list) else []


class ChatMessage(BaseModel):
    """One chat message; content is a string or a list of text parts."""

    model_config = STRICT

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (got null)")
        for part in self.content if isinstance(self.content, list) else ():
            if part.get("type") == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"a text part's text must be a string, got {part.get('text')!r:.40}")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported; send text")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    """The body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _max(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprob_count(self) -> int | None:
        """None: no log-probabilities; k: each token's, with the k most likely alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    """The body of POST /v1/completions: one prompt, as text or token ids."""

    prompt: str | list[int] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _echo(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise ValueError(
                "echo with logprobs asks for the prompt's log-probabilities, which this server does "
                "not compute; drop echo or logprobs"
            )
        return self

    @property
    def logprob_count(self) -> int | None:
        """None: no log-probabilities; k: each token's, with the k most likely alternatives."""
        return self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            return v[0]
        return v


Kind = Literal["chat", "completion"]
"""Which endpoint a request came in on; it decides the request body and the response shape."""

OpenAIRequest = ChatCompletionRequest | CompletionRequest
BODIES: dict[Kind, type[OpenAIRequest]] = {"chat": ChatCompletionRequest, "completion": CompletionRequest}
