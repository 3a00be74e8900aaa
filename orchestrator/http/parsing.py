"""OpenAI request in, SGLang request out: body → validated request → prompt ids and SamplingParams.

Every failure is an ApiError whose message says what to change (400), names the model served
(404), or the body limit (413).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2
from pydantic import ValidationError
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from orchestrator.config import ApiConfig
from orchestrator.errors import ApiError
from orchestrator.http.openai_types import (
    BODIES,
    ChatCompletionRequest,
    CompletionRequest,
    Kind,
    OpenAIRequest,
)
from orchestrator.http.tokenizer import ChatTemplateError, ChatTokenizer


def parse_request(body: bytes, kind: Kind, config: ApiConfig) -> OpenAIRequest:
    """The validated body of a /v1/chat/completions ("chat") or /v1/completions ("completion") call."""
    if len(body) > config.max_body_bytes:
        raise ApiError(413, f"request body over {config.max_body_bytes} bytes", code="body_too_large")
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raw = None  # nested past the parser's own limit: refused below
    if raw is None or too_deep(raw, MAX_DEPTH):
        raise ApiError(400, f"request body is nested deeper than {MAX_DEPTH} levels", code="invalid_json")
    if not isinstance(raw, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:  # JSON may escape half a surrogate pair ("\ud800"); no tokenizer can take that
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400,
            f"request body has a lone surrogate ({e.object[e.start : e.end]!a}); "
            "text must be valid Unicode (send surrogates in pairs)",
            code="invalid_unicode",
        ) from None
    try:
        req = BODIES[kind].model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(400, f"{where}: {err['msg']}" if where else err["msg"], param=where) from None
    if req.model not in (config.served_model_name, str(config.model_dir)):
        raise ApiError(
            404,
            f"model {req.model!r} does not exist; this server serves {config.served_model_name!r}",
            code="model_not_found",
            param="model",
        )
    return req


MAX_DEPTH = 32
"""The deepest nesting a request body may have (an OpenAI body needs 5)."""


def too_deep(value: Any, limit: int) -> bool:
    """Whether `value` nests containers more than `limit` deep (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def prompt_ids(req: OpenAIRequest, tokenizer: ChatTokenizer) -> list[int]:
    """The prompt's token ids: chat messages through the model's chat template, text encoded, ids as sent."""
    if isinstance(req, ChatCompletionRequest):
        try:
            return tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.text()} for m in req.messages]
            )
        except (ChatTemplateError, ValueError) as e:
            raise ApiError(400, str(e), param="messages") from None
    ids = req.prompt if isinstance(req.prompt, list) else tokenizer.encode(req.prompt)
    if not ids:
        raise ApiError(400, "prompt is empty", param="prompt")
    vocab = tokenizer.model_vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ApiError(
            400, f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}", param="prompt"
        )
    return ids


def prompt_text(req: OpenAIRequest, ids: list[int], tokenizer: ChatTokenizer) -> str:
    """A completion's prompt as text, for `echo`: as sent, or its token ids decoded ("" otherwise)."""
    if not isinstance(req, CompletionRequest) or not req.echo:
        return ""
    return req.prompt if isinstance(req.prompt, str) else tokenizer.decode(ids, skip_special_tokens=False)


LIMITS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "top_k": (-1, 1 << 30), "min_p": (0.0, 1.0)}
"""The sampling fields generation_config.json may set, and their ranges."""


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves a sampling parameter unset gets: the model's own recommendation
    from its generation_config.json (DeepSeek-R1 ships temperature 0.6, top_p 0.95), else OpenAI's
    defaults. As vLLM and SGLang do, the file's values count whatever its `do_sample` says."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a reply besides config.json's EOS: the chat template's turn end (Kimi K2's
    `<|im_end|>`) and generation_config.json's eos_token_id (unless a request ignores EOS)."""

    @classmethod
    def from_dir(cls, model_dir: Path, turn_end_ids: tuple[int, ...] = ()) -> SamplingDefaults:
        path = Path(model_dir) / "generation_config.json"
        if not path.is_file():
            return cls(stop_token_ids=turn_end_ids)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        given = {f.name: raw[f.name] for f in fields(cls) if raw.get(f.name) is not None and f.name in LIMITS}
        for name, value in given.items():
            low, high = LIMITS[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise ValueError(f"{path}: {name}={value!r} is not a number in [{low}, {high}]")
        eos = raw.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
        stops = tuple(dict.fromkeys([*turn_end_ids, *(int(t) for t in eos_ids)]))
        return cls(**given, stop_token_ids=stops)


def sampling_params(
    req: OpenAIRequest, prompt_len: int, limit: int, defaults: SamplingDefaults = SamplingDefaults()
) -> pb.SamplingParams:
    """SGLang's sampling parameters for `req`; `limit` is the model's context (0: not known yet, no check).

    max_tokens defaults to what is left of the context; unset sampling parameters to `defaults`;
    a seed travels in `custom_params`, as decimal text.
    """
    if limit and prompt_len >= limit:
        raise ApiError(
            400,
            f"the prompt has {prompt_len} tokens but the model's context is {limit} tokens; "
            "shorten the prompt",
            code="context_length_exceeded",
            param="messages",
        )
    max_tokens = req.max_tokens if req.max_tokens is not None else max(1, limit - prompt_len)
    if limit and prompt_len + max_tokens > limit:
        raise ApiError(
            400,
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
            f"context of {limit} tokens; lower max_tokens",
            code="context_length_exceeded",
            param="max_tokens",
        )
    sp = pb.SamplingParams(
        temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        top_k=defaults.top_k if req.top_k is None else req.top_k,
        min_p=defaults.min_p if req.min_p is None else req.min_p,
        max_new_tokens=max_tokens,
        ignore_eos=req.ignore_eos,
        skip_special_tokens=req.skip_special_tokens,
        stop_token_ids=() if req.ignore_eos else defaults.stop_token_ids,
        n=1,
    )
    if req.seed is not None:  # as text: a double would round seeds past 2^53
        sp.custom_params.CopyFrom(
            struct_pb2.Struct(fields={"seed": struct_pb2.Value(string_value=str(req.seed))})
        )
    return sp
