"""Our hand-off messages <-> KV types."""

from __future__ import annotations

from services.kv import KVLayout
from services.proto.moeserve.v1 import kv_handoff_pb2 as kvpb


def layout_to_proto(layout: KVLayout) -> kvpb.KVLayout:
    return kvpb.KVLayout(
        architecture=layout.architecture,
        num_layers=layout.num_layers,
        entry_shape=list(layout.entry_shape),
        dtype=layout.dtype,
        page_size=layout.page_size,
        fingerprint=layout.fingerprint,
    )


def layout_from_proto(msg: kvpb.KVLayout) -> KVLayout:
    return KVLayout(msg.architecture, msg.num_layers, tuple(msg.entry_shape), msg.dtype, msg.page_size)
