"""Worker (gRPC) failures as the HTTP status and OpenAI error type a client sees."""

from __future__ import annotations

import grpc
import pytest

from orchestrator.errors import ApiError, upstream_error


@pytest.mark.parametrize(
    "code, status, type_",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 503, "service_unavailable"),
        (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
        (grpc.StatusCode.INTERNAL, 502, "upstream_error"),
        (grpc.StatusCode.CANCELLED, 502, "upstream_error"),
    ],
)
def test_grpc_status_maps_to_http(code, status, type_):
    err = upstream_error("decode", "10.0.0.2:50051", code, "KV hand-off from prefill failed")
    assert (err.status, err.type) == (status, type_)
    assert str(err) == f"decode worker 10.0.0.2:50051 failed ({code.name}): KV hand-off from prefill failed"


def test_error_body_is_openai_shaped():
    err = ApiError(429, "slow down", "rate_limit_error", "too_many_requests", headers={"Retry-After": "1"})
    assert err.body() == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "too_many_requests",
        }
    }
    assert err.headers == {"Retry-After": "1"}
    assert ApiError(400, "bad").headers == {}
