"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health, /ready
(and the admin API, `admin.py`).

Routes only; a completion request goes parse → admit → generate → text → respond:
`parsing`, `admission`, `generate` (through the router's lease), `text`, `responses` + `envelopes`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from orchestrator import metrics
from orchestrator.admin import add_admin_routes, check_admin
from orchestrator.config import ApiConfig
from orchestrator.dispatch.background import settle
from orchestrator.dispatch.generate import generate
from orchestrator.dispatch.policies import PrefillPolicy
from orchestrator.dispatch.router import Router
from orchestrator.errors import ApiError
from orchestrator.fleet.autoscaler import Autoscaler
from orchestrator.fleet.kv_event_feed import KvEventFeed
from orchestrator.fleet.membership import Membership
from orchestrator.fleet.registry import Registry
from orchestrator.http.admission import Admission
from orchestrator.http.detokenize import text_events
from orchestrator.http.envelopes import Envelope
from orchestrator.http.guard import Guard, RequestIds
from orchestrator.http.openai_types import Kind
from orchestrator.http.parsing import (
    SamplingDefaults,
    parse_request,
    prompt_ids,
    prompt_text,
    sampling_params,
)
from orchestrator.http.ratelimit import TokenBuckets, charged
from orchestrator.http.remote_tokenizer import load_tokenizer
from orchestrator.http.responses import respond

log = logging.getLogger(__name__)
SETTLE_S = 0.5
"""At shutdown, how long ended requests' aborts may still take before the channels close."""


def create_app(
    config: ApiConfig,
    registry: Registry,
    membership: Membership,
    policy: PrefillPolicy | None = None,
    autoscaler: Autoscaler | None = None,
) -> FastAPI:
    """The app; `app.state.admission.close()` starts an orderly stop (serve calls it on SIGINT/SIGTERM).

    `policy` picks prefill instances (default: least load); `autoscaler` (off without one) sets
    the pools' sizes."""
    tokenizer = load_tokenizer(config.model_dir, config.trust_remote_code)
    defaults = SamplingDefaults.from_dir(config.model_dir, tokenizer.turn_end_ids)
    router = Router(registry, policy=policy, decode_first=config.dispatch == "auto")
    feed = KvEventFeed(registry, router.policy)
    admission = Admission(config.max_concurrency, config.max_queue, config.queue_timeout_s)
    buckets = None
    if config.key_token_rate > 0:
        buckets = TokenBuckets(config.key_token_rate, config.key_token_burst or 60 * config.key_token_rate)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await membership.start()
        await registry.start()
        await feed.start()
        if autoscaler is not None:
            await autoscaler.start()
        yield
        if autoscaler is not None:
            await autoscaler.stop()
        admission.close()
        await settle(SETTLE_S)
        await feed.stop()
        await membership.stop()
        await registry.stop()

    # The API's description names the admin routes: only for a server nobody else can reach.
    open_ = not (config.api_keys or config.admin_token or config.public)
    app = FastAPI(
        title="moeserve",
        lifespan=lifespan,
        docs_url="/docs" if open_ else None,
        redoc_url="/redoc" if open_ else None,
        openapi_url="/openapi.json" if open_ else None,
    )
    app.state.router, app.state.admission, app.state.membership = router, admission, membership
    add_admin_routes(app, registry, membership, autoscaler)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        """A failure of this server, not the request's: the OpenAI error shape, no traceback (it
        goes to the log with the request id)."""
        log.exception("request %s failed", getattr(request.state, "request_id", "-"))
        return error_response(
            ApiError(500, "internal error; retry, and report it if it persists", "api_error")
        )

    def check_v1(request: Request) -> None:
        if config.api_keys:
            auth = request.headers.get("authorization", "")
            if not auth.startswith("Bearer ") or auth[7:] not in config.api_keys:
                raise ApiError(
                    401,
                    "invalid or missing API key; send Authorization: Bearer <key>",
                    "authentication_error",
                    "invalid_api_key",
                )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            raise ApiError(413, f"request body over {config.max_body_bytes} bytes", code="body_too_large")

    def check_admin_request(request: Request) -> None:
        check_admin(request, config.admin_token or None, config.api_keys, config.public)

    app.add_middleware(Guard, rules=[("/v1/", check_v1), ("/admin/", check_admin_request)])
    app.add_middleware(RequestIds)  # outermost: refusals carry the id too

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        try:  # the workers' addresses only for whoever may use the admin API
            check_admin(request, config.admin_token or None, config.api_keys, config.public)
            workers: dict[str, bool] | None = {i.address: i.healthy for i in registry.all}
        except ApiError:
            workers = None
        if admission.closing:
            return JSONResponse(_ready("shutting down", workers), status_code=503)
        if (problem := membership.problem()) is not None:
            return JSONResponse(_ready(f"membership: {problem}", workers), status_code=503)
        if registry.ready:
            return JSONResponse(_ready("ready", workers))
        return JSONResponse(_ready("not ready", workers), status_code=503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if config.admin_token:  # with an admin token configured, metrics need it too
            check_admin(request, config.admin_token, config.api_keys, config.public)
        return Response(metrics.exposition(registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {
            "id": config.served_model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "moeserve",
            "max_model_len": registry.context_limit(),
        }
        return {"object": "list", "data": [model]}

    async def complete(request: Request, kind: Kind) -> Response:
        start = time.monotonic()
        model = config.served_model_name
        try:
            req = parse_request(await read_body(request, config.max_body_bytes), kind, config)
            prompt = prompt_ids(req, tokenizer)
            sampling = sampling_params(req, len(prompt), registry.context_limit(), defaults)
            key = request.headers.get("authorization", "")
            if buckets is not None:
                buckets.admit(key, len(prompt))
            slot = await admission.enter()
        except ApiError as e:
            metrics.REQUESTS.labels(model, metrics.outcome_of(e.status)).inc()
            raise
        metrics.QUEUE_TIME.labels(model).observe(slot.waited)
        rid = request.state.request_id
        envelope = Envelope.for_request(kind, req, model, rid, prompt_text(req, prompt, tokenizer))
        work = generate(router, prompt, sampling, rid, req.logprob_count)  # the workers know it by `rid`
        tokens = metrics.timed(work, model, start, rid)
        if buckets is not None:
            tokens = charged(tokens, buckets, key)
        events = text_events(tokens, tokenizer, req.stop_list, req.skip_special_tokens)
        return await respond(envelope, req.stream, events, slot, admission, request)

    async def chat(request: Request) -> Response:
        return await complete(request, "chat")

    async def completions(request: Request) -> Response:
        return await complete(request, "completion")

    # Plain routes: the request is parsed by `parsing`, so FastAPI's per-request dependency solving
    # would be work for nothing on the hottest paths.
    app.add_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (a chunked upload has no length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def error_response(err: ApiError) -> JSONResponse:
    """An ApiError as the JSON response OpenAI clients parse."""
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _ready(status: str, workers: dict[str, bool] | None) -> dict[str, Any]:
    return {"status": status} if workers is None else {"status": status, "workers": workers}
