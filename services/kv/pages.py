"""Address math for copying token ranges between two workers' paged, layer-major KV storage."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVRegion:
    """Where a worker's KV lives: slot s of layer l is at base + l * layer_stride + s * entry_bytes."""

    base: int
    layer_stride: int
    entry_bytes: int
    page_size: int

    def slot_address(self, layer: int, page: int, offset: int) -> int:
        return self.base + layer * self.layer_stride + (page * self.page_size + offset) * self.entry_bytes


def copy_descriptors(
    layer: int,
    start: int,
    end: int,
    src: KVRegion,
    src_pages: list[int],
    dst: KVRegion,
    dst_pages: list[int],
) -> tuple[list[int], list[int], list[int]]:
    """(src addresses, dst addresses, lengths) moving tokens [start, end) of one layer.

    Both sides use the same page size (checked by the layout fingerprint), so each run of tokens
    inside one page is contiguous on both sides. Runs that continue each other on both sides
    (consecutive pages, as a fresh pool hands them out) merge into one descriptor: per-descriptor
    cost dominates small writes.
    """
    ps = src.page_size
    srcs: list[int] = []
    dsts: list[int] = []
    lens: list[int] = []
    i = start
    while i < end:
        page, offset = divmod(i, ps)
        run = min(end, (page + 1) * ps) - i
        s_addr = src.slot_address(layer, src_pages[page], offset)
        d_addr = dst.slot_address(layer, dst_pages[page], offset)
        nbytes = run * src.entry_bytes
        if srcs and srcs[-1] + lens[-1] == s_addr and dsts[-1] + lens[-1] == d_addr:
            lens[-1] += nbytes
        else:
            srcs.append(s_addr)
            dsts.append(d_addr)
            lens.append(nbytes)
        i += run
    return srcs, dsts, lens
