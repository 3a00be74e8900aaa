"""Checks that run before any route, and request ids, as plain ASGI middleware.

Starlette's `BaseHTTPMiddleware` (what `@app.middleware("http")` makes) hides a client's
disconnect from the route behind it, so a request whose client left would run on; this one
passes `receive` through untouched.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.errors import ApiError
from services.common.logs import REQUEST_ID

Check = Callable[[Request], None]
"""Raises ApiError if the request may not go on."""


class Guard:
    """Runs `check` for requests whose path starts with a rule's prefix; answers its ApiError."""

    def __init__(self, app: ASGIApp, rules: list[tuple[str, Check]]):
        self.app, self.rules = app, rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            for prefix, check in self.rules:
                if scope["path"].startswith(prefix):
                    try:
                        check(request)
                    except ApiError as e:
                        await _answer(e, scope, receive, send)
                        return
        await self.app(scope, receive, send)


HEADER = "x-request-id"
VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIds:
    """Every /v1/ request gets an id: the client's `x-request-id` or a fresh one.

    It is in `request.state.request_id` and `services.common.logs.REQUEST_ID` (so every log record made
    for the request carries it), names the request on the workers, and goes back in the
    response's `x-request-id` header, errors included. An id already in flight is a 409.
    """

    def __init__(self, app: ASGIApp, prefix: str = "/v1/"):
        self.app, self.prefix = app, prefix
        self.in_flight: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        rid, error = self._id(Request(scope).headers.get(HEADER))
        if error is not None:
            await _answer(error, scope, receive, _with_header(send, rid))
            return
        scope.setdefault("state", {})["request_id"] = rid
        self.in_flight.add(rid)
        token = REQUEST_ID.set(rid)
        try:
            await self.app(scope, receive, _with_header(send, rid))
        finally:
            REQUEST_ID.reset(token)
            self.in_flight.discard(rid)

    def _id(self, given: str | None) -> tuple[str, ApiError | None]:
        """The request's id, and the error that refuses it (a fresh id then names the answer)."""
        if given is None:
            return uuid.uuid4().hex, None
        if not VALID_ID.fullmatch(given):
            message = f"{HEADER} must be 1-128 characters of A-Z a-z 0-9 . _ : -"
            return uuid.uuid4().hex, ApiError(400, message, param=HEADER)
        if given in self.in_flight:
            message = f"request id {given!r} is already in flight; send a unique {HEADER}"
            return given, ApiError(409, message, param=HEADER)
        return given, None


def _with_header(send: Send, rid: str) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (HEADER.encode(), rid.encode())]
        await send(message)

    return sending


async def _answer(error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
    await response(scope, receive, send)
