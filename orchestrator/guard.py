"""Checks that run before any route, as plain ASGI middleware.

Starlette's `BaseHTTPMiddleware` (what `@app.middleware("http")` makes) hides a client's
disconnect from the route behind it, so a request whose client left would run on; this one
passes `receive` through untouched.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator.errors import ApiError

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
                        response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
                        await response(scope, receive, send)
                        return
        await self.app(scope, receive, send)
