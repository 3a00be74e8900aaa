"""KV transfer between workers: layout fingerprints, the Mooncake transfer engine, page address math."""

from services.kv.layout import KVLayout, LayoutMismatch
from services.kv.pages import KVRegion, copy_descriptors
from services.kv.transfer import TransferEngine, TransferError

__all__ = ["KVLayout", "KVRegion", "LayoutMismatch", "TransferEngine", "TransferError", "copy_descriptors"]
