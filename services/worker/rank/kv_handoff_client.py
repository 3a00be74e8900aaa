"""The decode side's gRPC client of prefill instances' KVHandoff service (one channel per prefill),
the transport `services.kv.decode` attaches pages and releases rooms through."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import cast

import grpc

from services.common import wire
from services.common.calls import CallError
from services.kv import AttachResult, AttachSpec
from services.proto.moeserve.v1 import kv_handoff_pb2 as kvpb
from services.proto.moeserve.v1 import kv_handoff_pb2_grpc as kvpb_grpc
from services.worker import proto_convert

RELEASE_TIMEOUT_S = 30.0
"""Longer than the prefill's own wait for its writes to settle (services.worker.front.kv_handoff_rpcs)."""


class GrpcAttachClient:
    """Attach / Release on prefill instances, by bootstrap address (host:port)."""

    def __init__(self) -> None:
        self._stubs: dict[str, kvpb_grpc.KVHandoffStub] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str) -> kvpb_grpc.KVHandoffStub:
        with self._lock:
            if address not in self._stubs:
                channel = grpc.insecure_channel(address)
                # grpc_tools generates the stub classes without annotations.
                self._stubs[address] = kvpb_grpc.KVHandoffStub(channel)  # type: ignore[no-untyped-call]
            return self._stubs[address]

    def attach(
        self,
        prefill: str,
        spec: AttachSpec,
        timeout: float,
        on_done: Callable[[AttachResult | CallError], None],
    ) -> Callable[[], bool]:
        future: grpc.Future[kvpb.AttachResponse] = self._stub(prefill).Attach.future(
            proto_convert.attach_to_proto(spec), timeout=timeout, metadata=wire.auth_metadata()
        )

        def done(f: grpc.Future[kvpb.AttachResponse]) -> None:
            if f.cancelled():
                on_done(CallError("CANCELLED", "the Attach was cancelled"))
                return
            try:
                on_done(proto_convert.result_from_proto(f.result()))
            except grpc.RpcError as e:
                # grpc's stubs type these as _Metadatum objects; they are (key, value) pairs, str for
                # keys like ours (no "-bin" suffix).
                metadata = cast(Iterable[tuple[str, str]], e.trailing_metadata())
                peer = wire.failed_peer(metadata)  # "decode": our side of it failed
                on_done(CallError(e.code().name, e.details() or e.code().name, peer))

        future.add_done_callback(done)
        return future.cancel

    def release(self, prefill: str, room: int, reason: str) -> bool:
        try:
            self._stub(prefill).Release(
                kvpb.ReleaseRequest(room=room, reason=reason),
                timeout=RELEASE_TIMEOUT_S,
                metadata=wire.auth_metadata(),
            )
        except grpc.RpcError as e:
            # Unreachable: the prefill is gone and writes nothing. Anything else: it could not confirm.
            return e.code() == grpc.StatusCode.UNAVAILABLE
        return True
