"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health, /ready."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf import struct_pb2
from pydantic import ValidationError
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from starlette.background import BackgroundTask

from orchestrator import protocol
from orchestrator.generate import TokenEvent, UpstreamError, generate
from orchestrator.router import NoWorkers, Router
from orchestrator.tokenizer import ChatTemplateError, IncrementalDetokenizer, StopStrings, Tokenizer
from orchestrator.workers import WorkerPool

log = logging.getLogger(__name__)


@dataclass
class ApiConfig:
    model_dir: Path
    served_model_name: str = ""
    api_keys: frozenset[str] = frozenset()
    """Bearer keys accepted on /v1/*; empty means no authentication (local use only)."""
    max_concurrency: int = 256
    """Requests in flight beyond this get 429 with Retry-After."""
    max_body_bytes: int = 1 << 20
    max_context: int = 0
    """Filled from the workers' GetModelInfo at start."""

    def __post_init__(self) -> None:
        if not self.served_model_name:
            self.served_model_name = Path(self.model_dir).name


class _Slot:
    """One admission slot, released exactly once whichever path ends the request."""

    def __init__(self, sem: asyncio.Semaphore):
        self.sem, self.held = sem, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.sem.release()


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.type, self.code, self.param, self.headers = status, type_, code, param, headers

    def response(self) -> JSONResponse:
        body = protocol.error_body(str(self), self.type, self.code, self.param)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def create_app(config: ApiConfig, pool: WorkerPool) -> FastAPI:
    tokenizer = Tokenizer(config.model_dir)
    router = Router(pool)
    slots = asyncio.Semaphore(config.max_concurrency)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await pool.start()
        context_limit()
        yield
        await pool.stop()

    app = FastAPI(title="moeserve", lifespan=lifespan)
    app.state.router = router

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if config.api_keys:
                auth = request.headers.get("authorization", "")
                if not auth.startswith("Bearer ") or auth[7:] not in config.api_keys:
                    return ApiError(
                        401,
                        "invalid or missing API key; send Authorization: Bearer <key>",
                        "authentication_error",
                        "invalid_api_key",
                    ).response()
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
                return ApiError(
                    413, f"request body over {config.max_body_bytes} bytes", code="body_too_large"
                ).response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        status = {w.address: w.healthy for w in pool.all}
        if pool.ready:
            return JSONResponse({"status": "ready", "workers": status})
        return JSONResponse({"status": "not ready", "workers": status}, status_code=503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": config.served_model_name,
                    "object": "model",
                    "created": protocol.now(),
                    "owned_by": "moeserve",
                    "max_model_len": context_limit(),
                }
            ],
        }

    async def parse(request: Request, model_cls):
        body = await request.body()
        if len(body) > config.max_body_bytes:
            raise ApiError(413, f"request body over {config.max_body_bytes} bytes", code="body_too_large")
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(raw, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:
            req = model_cls.model_validate(raw)
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

    def context_limit() -> int:
        """The smallest context of the workers (learned from GetModelInfo; 0 while none answered)."""
        if not config.max_context:
            infos = [w.info for w in pool.all if w.info is not None]
            if infos:
                config.max_context = min(i.max_context_length for i in infos)
        return config.max_context

    def sampling(req, prompt_len: int) -> pb.SamplingParams:
        limit = context_limit()
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
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p,
            max_new_tokens=max_tokens,
            ignore_eos=req.ignore_eos,
            skip_special_tokens=req.skip_special_tokens,
            n=1,
        )
        if req.seed is not None:
            sp.custom_params.CopyFrom(
                struct_pb2.Struct(fields={"seed": struct_pb2.Value(number_value=req.seed)})
            )
        return sp

    async def run(request: Request, kind: str) -> Response:
        if kind == "chat":
            req = await parse(request, protocol.ChatCompletionRequest)
            try:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                prompt_ids = tokenizer.apply_chat_template(messages)
            except (ChatTemplateError, ValueError) as e:
                raise ApiError(400, str(e), param="messages") from None
        else:
            req = await parse(request, protocol.CompletionRequest)
            prompt_ids = req.prompt if isinstance(req.prompt, list) else tokenizer.encode(req.prompt)
            if not prompt_ids:
                raise ApiError(400, "prompt is empty", param="prompt")
        sp = sampling(req, len(prompt_ids))
        if slots.locked():
            raise ApiError(
                429,
                f"over {config.max_concurrency} requests in flight; retry shortly",
                "rate_limit_error",
                "too_many_requests",
                headers={"Retry-After": "1"},
            )
        await slots.acquire()
        slot = _Slot(slots)
        rid = protocol.new_id("chatcmpl" if kind == "chat" else "cmpl")
        events = text_events(generate(router, prompt_ids, sp, rid), req)

        async def finish() -> None:
            # Idempotent; also runs when the client left before the stream body started (then
            # `_sse` never runs): closing the events cancels both worker calls and aborts.
            await events.aclose()
            slot.release()

        try:
            first = await _first(events)  # errors before the first token keep their HTTP status
        except BaseException:
            await finish()
            raise
        if req.stream:
            return StreamingResponse(
                _sse(kind, rid, req, first, events, finish),
                media_type="text/event-stream",
                background=BackgroundTask(finish),
            )
        try:
            return JSONResponse(await _collect(kind, rid, req, first, events))
        finally:
            await finish()

    async def text_events(tokens: AsyncIterator[TokenEvent], req) -> AsyncIterator[tuple[str, TokenEvent]]:
        detok = IncrementalDetokenizer(tokenizer, req.skip_special_tokens)
        stops = StopStrings(req.stop_list)
        try:
            async for ev in tokens:
                final = ev.finish_reason is not None
                text = stops.feed(detok.add(ev.token_ids) + (detok.flush() if final else ""), final=final)
                if stops.matched is not None:
                    yield (
                        text,
                        TokenEvent([], "stop", ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens),
                    )
                    return  # closing the token stream aborts the request on both workers
                yield text, ev
        except UpstreamError as e:
            raise ApiError(e.status, str(e), e.type) from None
        except NoWorkers as e:
            raise ApiError(503, str(e), "service_unavailable") from None
        finally:
            await tokens.aclose()

    async def _first(events):
        try:
            return await events.__anext__()
        except StopAsyncIteration:
            raise ApiError(502, "the workers returned no output", "upstream_error") from None

    async def _collect(kind, rid, req, first, events) -> dict[str, Any]:
        parts, last = [first[0]], first[1]
        async for text, ev in events:
            parts.append(text)
            last = ev
        text = "".join(parts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = (req.prompt if req.echo and isinstance(req.prompt, str) else "") + text
        return {
            "id": rid,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": protocol.now(),
            "model": config.served_model_name,
            "choices": [choice],
            "usage": protocol.usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens),
        }

    async def _sse(kind, rid, req, first, events, finish) -> AsyncIterator[str]:
        created = protocol.now()
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if kind == "chat":
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": delta,
                    "finish_reason": finish,
                    "logprobs": None,
                }
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            body = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": config.served_model_name,
                "choices": [choice],
            }
            if req.stream_options is not None and req.stream_options.include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        try:
            if kind == "chat":
                yield chunk("", None, role=True)
            last = None
            pending = [first]
            while True:
                for text, ev in pending:
                    last = ev
                    if text or ev.finish_reason:
                        yield chunk(text, ev.finish_reason)
                if last is not None and last.finish_reason is not None:
                    break
                try:
                    pending = [await events.__anext__()]
                except StopAsyncIteration:
                    break
            if req.stream_options is not None and req.stream_options.include_usage and last is not None:
                body = {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": config.served_model_name,
                    "choices": [],
                    "usage": protocol.usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens),
                }
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as e:  # after the first token the status is sent: report in the stream
            yield f"data: {json.dumps(protocol.error_body(str(e), e.type, e.code))}\n\n"
        finally:
            await finish()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await run(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await run(request, "completion")

    return app
