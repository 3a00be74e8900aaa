"""Chained hashes of page-aligned token blocks: how a prefix cache names what it holds.

Block i's hash covers tokens [0, (i+1)·block): H(hash of block i-1, block i's token ids), from 0,
63 bits of BLAKE2b. The prefill workers' caches publish these in their KV events and the
orchestrator's prefix-affinity index computes them from prompts, so both name a prefix the same
way. Pure Python and dependency-free (both sides of the import contracts use it).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

MASK = (1 << 63) - 1


def next_hash(parent: int, block: Sequence[int]) -> int:
    """The hash of a block given its parent's (0 for the first block)."""
    data = parent.to_bytes(8, "little") + array("I", block).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & MASK


def block_hashes(token_ids: Sequence[int], block: int) -> list[int]:
    """The chained hashes of `token_ids`' full blocks."""
    out, h = [], 0
    for start in range(0, len(token_ids) - len(token_ids) % block, block):
        h = next_hash(h, token_ids[start : start + block])
        out.append(h)
    return out
