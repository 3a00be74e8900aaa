"""`prefix_affinity`: send a prompt where its longest prefix was computed, within a load bound.

An approximate index maps the chained hash of each page-aligned block of a prompt (block i's
hash covers tokens [0, (i+1)·block), `services.common.prefix_hash`) to the (instance, DP rank) targets
that hold it (the last few). It is fed by this orchestrator's own decisions (at once) and
corrected by the workers' own reports (`observe`: the KV events of their prefix caches, blocks
stored and evicted, followed by `kv_feed`); it holds at most `index_size` blocks, least recently
used out. A new prompt goes to the least loaded target of its longest indexed
prefix, pinned to that DP rank (each rank has its own cache), unless loads are out of balance:
the target has more than `balance_abs` requests in flight beyond the least loaded instance
*and* more than `balance_rel` times its count. Then, or with no match, the least loaded
instance takes it, on the DP rank its first block hashes to, and becomes a target too. Targets
on instances that are no longer ready are skipped and age out. Like SGLang's cache-aware router
(an approximate tree of what each worker was sent, and balance thresholds).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from smg_grpc_proto.generated import common_pb2

from orchestrator.fleet.instance import Instance
from services.common.picking import LeastLoaded
from services.common.prefix_hash import block_hashes

Target = tuple[str, int | None]
"""(instance id, DP rank) a prefix block was routed to."""
MAX_HOLDERS = 4
"""Targets remembered per block (a prefix that overflowed its first instance lives on others too)."""


@dataclass
class PrefixAffinity:
    block_tokens: int = 16
    """Tokens per indexed block: the prefill workers' KV page size (their cache's granularity)."""
    balance_abs: int = 8
    """In-flight requests the preferred instance may carry beyond the least loaded one..."""
    balance_rel: float = 1.5
    """...or at most this many times its count (beyond both, the least loaded one is taken)."""
    index_size: int = 200_000
    """Blocks remembered in all (about 40 bytes each plus the key)."""
    _index: OrderedDict[int, dict[Target, None]] = field(default_factory=OrderedDict, init=False, repr=False)
    _picker: LeastLoaded = field(default_factory=LeastLoaded, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.block_tokens < 1 or self.index_size < 1 or self.balance_abs < 0 or self.balance_rel < 1:
            raise ValueError("prefix_affinity needs block_tokens >= 1, index_size >= 1, balance_abs >= 0, "
                             "balance_rel >= 1")  # fmt: skip

    def pick(self, ready: Sequence[Instance], prompt_ids: Sequence[int]) -> tuple[Instance, int | None]:
        hashes = self._hashes(prompt_ids)
        by_id = {inst.id: inst for inst in ready}
        target: tuple[Instance, int | None] | None = None
        for h in reversed(hashes):  # the longest indexed prefix held on a ready instance
            holders = [(by_id[i], rank) for i, rank in self._index.get(h, ()) if i in by_id]
            if holders:
                target = min(holders, key=lambda t: t[0].inflight)
                break
        least = self._picker.pick(ready, load=lambda i: i.inflight)
        if target is None or self._imbalanced(target[0], least):
            target = (least, _rank_for(least, hashes))
        self._remember(hashes, (target[0].id, target[1]))
        return target

    def _remember(self, hashes: list[int], target: Target) -> None:
        for h in hashes:
            holders = self._index.get(h)
            if holders is None:
                holders = self._index[h] = {}
            holders.pop(target, None)
            holders[target] = None  # most recent last
            while len(holders) > MAX_HOLDERS:
                del holders[next(iter(holders))]
            self._index.move_to_end(h)
        while len(self._index) > self.index_size:
            self._index.popitem(last=False)

    def _imbalanced(self, preferred: Instance, least: Instance) -> bool:
        extra = preferred.inflight - least.inflight
        return extra > self.balance_abs and preferred.inflight > self.balance_rel * least.inflight

    def _hashes(self, ids: Sequence[int]) -> list[int]:
        return block_hashes(ids, self.block_tokens)

    def observe(self, instance_id: str, dp_rank: int | None, event: common_pb2.KvCacheEvent) -> None:
        """A worker's report: blocks its rank now caches, no longer caches, or a cleared cache."""
        target = (instance_id, dp_rank)
        kind = event.WhichOneof("data")
        if kind == "stored":
            self._remember([b.block_hash for b in event.stored.blocks], target)
        elif kind == "removed":
            for h in event.removed.block_hashes:
                self._drop(h, target)
        elif kind == "cleared":
            self.forget(instance_id, dp_rank)

    def forget(self, instance_id: str, dp_rank: int | None = None, any_rank: bool = False) -> None:
        """Drop an instance's targets (one DP rank's, or all with `any_rank`)."""
        for h in list(self._index):
            for target in [
                t for t in self._index[h] if t[0] == instance_id and (any_rank or t[1] == dp_rank)
            ]:
                self._drop(h, target)

    def _drop(self, h: int, target: Target) -> None:
        holders = self._index.get(h)
        if holders is not None:
            holders.pop(target, None)
            if not holders:
                del self._index[h]


def _rank_for(inst: Instance, hashes: list[int]) -> int | None:
    """A new prefix's DP rank: spread by the hash of its first block (prompts that share it meet
    on one rank); None for a one-rank instance or one whose ranks are not known yet."""
    ranks = len(inst.loads)
    if ranks <= 1:
        return None
    return (hashes[0] if hashes else 0) % ranks
