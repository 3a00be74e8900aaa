"""The one error the HTTP edge reports, its OpenAI body, and how worker (gRPC) failures map onto it."""

from __future__ import annotations

from typing import Any

import grpc

# gRPC status from a worker -> (HTTP status, OpenAI error type); anything else is a 502.
GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "service_unavailable"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class ApiError(Exception):
    """A request failed: the HTTP status, the OpenAI error body's fields, and extra headers."""

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
        self.status, self.type, self.code, self.param = status, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error object, as JSON body or as a stream's error event."""
        return error_body(str(self), self.type, self.code, self.param)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def upstream_error(side: str, address: str, code: grpc.StatusCode, details: str | None) -> ApiError:
    """A worker call that ended with a gRPC status, as the client should see it."""
    status, type_ = GRPC_TO_HTTP.get(code, (502, "upstream_error"))
    return ApiError(status, f"{side} worker {address} failed ({code.name}): {details}", type_)
