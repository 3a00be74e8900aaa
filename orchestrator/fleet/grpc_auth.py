"""The workers' shared gRPC token on every call the orchestrator makes to them (`wire.TOKEN_ENV`).

One interceptor per call shape of `grpc.aio`, each adding `authorization: Bearer <token>` to the
call's metadata (after whatever metadata the call carries, e.g. decode-first's forwarding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from services.common import wire


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *wire.auth_metadata(token))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(_with_token(details, self.token), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(_with_token(details, self.token), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(_with_token(details, self.token), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(_with_token(details, self.token), requests)


def channel(address: str) -> grpc.aio.Channel:
    """An insecure `grpc.aio` channel to a worker that sends this process's gRPC token, if any."""
    token = wire.grpc_token()
    if not token:
        return grpc.aio.insecure_channel(address)
    interceptors = [_UnaryUnary(token), _UnaryStream(token), _StreamUnary(token), _StreamStream(token)]
    return grpc.aio.insecure_channel(address, interceptors=interceptors)
