"""What a moeserve worker makes of a Generate's sampling parameters: a seed it cannot take is the
request's fault (INVALID_ARGUMENT, never retried, never charged to the instance), not its own."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from services.engine import InvalidRequestError
from services.worker.proto_convert import sampling_from_proto


def params(seed: struct_pb2.Value) -> pb.SamplingParams:
    sp = pb.SamplingParams(temperature=1.0, max_new_tokens=4)
    sp.custom_params.CopyFrom(struct_pb2.Struct(fields={"seed": seed}))
    return sp


@pytest.mark.parametrize(
    "value, seed",
    [
        (struct_pb2.Value(string_value="9223372036854775807"), 2**63 - 1),
        (struct_pb2.Value(string_value="-42"), -42),
        (struct_pb2.Value(number_value=1234.0), 1234),  # as older orchestrators send it
    ],
)
def test_a_64_bit_seed_arrives_exactly(value, seed):
    assert sampling_from_proto(params(value), 3, 100).seed == seed


@pytest.mark.parametrize(
    "value",
    [
        struct_pb2.Value(string_value=str(2**64)),
        struct_pb2.Value(string_value="9" * 401),
        struct_pb2.Value(string_value="seven"),
        struct_pb2.Value(number_value=1.5),
        struct_pb2.Value(number_value=float("inf")),
        struct_pb2.Value(number_value=2.0**70),
        struct_pb2.Value(bool_value=True),
    ],
)
def test_a_seed_the_worker_cannot_take_is_an_invalid_request(value):
    with pytest.raises(InvalidRequestError, match="seed"):
        sampling_from_proto(params(value), 3, 100)
