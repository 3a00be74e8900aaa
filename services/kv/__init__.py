"""The KV hand-off between prefill and decode: layouts, page address math, the Mooncake transfer
engine, bootstrap rooms, the prefill sender and the decode side's WAITING_FOR_KV source."""

from services.kv.layout import KVLayout, LayoutMismatch
from services.kv.pages import KVRegion, copy_descriptors
from services.kv.rooms import AttachResult, AttachSpec
from services.kv.transfer import TransferEngine, TransferError

__all__ = [
    "AttachResult",
    "AttachSpec",
    "KVLayout",
    "KVRegion",
    "LayoutMismatch",
    "TransferEngine",
    "TransferError",
    "copy_descriptors",
]
