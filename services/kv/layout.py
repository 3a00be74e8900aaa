"""What a KV page's bytes depend on; two workers may exchange KV only when these agree."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


class LayoutMismatch(ValueError):
    """The two sides of a KV hand-off lay KV out differently."""


@dataclass(frozen=True)
class KVLayout:
    """The shape of one worker's KV pages; its fingerprint must match across a hand-off."""

    architecture: str
    num_layers: int
    entry_shape: tuple[int, ...]
    """One token's KV in one layer: MLA (latent + rope,), GQA (2, kv heads, head dim)."""
    dtype: str
    page_size: int

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def entry_bytes(self) -> int:
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        n = itemsize
        for d in self.entry_shape:
            n *= d
        return n

    def describe(self) -> str:
        return (
            f"{self.architecture}, {self.num_layers} layers, KV entry {list(self.entry_shape)} {self.dtype}, "
            f"page {self.page_size} tokens"
        )

    def check_compatible(self, other: KVLayout) -> None:
        """Raise `LayoutMismatch` naming both layouts unless `other` is the same layout."""
        if other != self:
            raise LayoutMismatch(
                f"KV layout mismatch: this worker has {self.describe()} (fingerprint {self.fingerprint}), "
                f"the peer has {other.describe()} (fingerprint {other.fingerprint}); pair workers that "
                "serve the same model with the same dtype and page size"
            )
