"""Fixed-size KV pages: the allocator (which page belongs to whom) and the cache tensors behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class KVStats:
    """Page pool occupancy and the prefix cache's share of it."""

    page_size: int
    total_pages: int
    free_pages: int
    cached_pages: int = 0
    """Pages the prefix cache holds (some in use by requests, the rest evictable)."""
    evictable_pages: int = 0
    """Cached pages no request uses: available to any request that needs them."""

    @property
    def used_pages(self) -> int:
        """Pages requests hold (evictable cached pages count as available, not used)."""
        return self.total_pages - self.free_pages - self.evictable_pages


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than asked for; nothing was allocated."""


class Reclaimer(Protocol):
    """Holds pages it can give back on demand (the prefix cache's unused pages)."""

    num_evictable: int

    def evict(self, num_pages: int) -> int: ...


class PagePool:
    """Hands out page ids in [0, num_pages). A slot is `page * page_size + offset`.

    With a `reclaimer` (the prefix cache), pages it holds unused count as available: `allocate`
    has it free what is missing first.
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one page of at least one token, got {num_pages} x {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._used: set[int] = set()
        self.reclaimer: Reclaimer | None = None

    @property
    def num_free(self) -> int:
        """Pages nobody holds."""
        return len(self._free)

    @property
    def num_available(self) -> int:
        """Pages an `allocate` can hand out now: free ones and the reclaimer's unused ones."""
        return len(self._free) + (self.reclaimer.num_evictable if self.reclaimer is not None else 0)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free) and self.reclaimer is not None:
            self.reclaimer.evict(n - len(self._free))
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} KV pages, {len(self._free)} free of {self.num_pages}")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            if page not in self._used:
                raise ValueError(f"KV page {page} freed twice or never allocated")
            self._used.remove(page)
            self._free.append(page)


class KVCache:
    """One tensor per layer, [num_pages * page_size, *entry_shape], carved from one allocation.

    Layer-major layout keeps each layer's pages contiguous, so a finished layer can be shipped
    to another worker while the next one computes.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        entry_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.storage = torch.zeros(
            num_layers, num_pages * page_size, *entry_shape, dtype=dtype, device=device
        )
        self.layers = list(self.storage.unbind(0))

    @staticmethod
    def bytes_per_token(num_layers: int, entry_shape: tuple[int, ...], dtype: torch.dtype) -> int:
        n = num_layers * dtype.itemsize
        for d in entry_shape:
            n *= d
        return n
