import torch

from services.kv import KVLayout, KVRegion, LayoutMismatch, copy_descriptors


def regions(num_pages=8, page_size=4, entry=3, layers=2):
    src = torch.arange(layers * num_pages * page_size * entry, dtype=torch.uint8).view(layers, -1, entry)
    dst = torch.zeros_like(src)
    mk = lambda t: KVRegion(t.data_ptr(), t[0].nbytes, entry, page_size)  # noqa: E731
    return src, dst, mk(src), mk(dst)


def apply(src, dst, descs):
    base_s, base_d = src.data_ptr(), dst.data_ptr()
    flat_s, flat_d = src.view(-1), dst.view(-1)
    for s, d, n in zip(*descs, strict=True):
        flat_d[d - base_d : d - base_d + n] = flat_s[s - base_s : s - base_s + n]


def test_descriptors_move_exactly_the_token_range_between_page_tables():
    src, dst, rs, rd = regions()
    src_pages, dst_pages = [5, 2, 7], [0, 6, 3]
    descs = copy_descriptors(1, 2, 11, rs, src_pages, rd, dst_pages)
    apply(src, dst, descs)
    for i in range(12):
        s = src[1, src_pages[i // 4] * 4 + i % 4]
        d = dst[1, dst_pages[i // 4] * 4 + i % 4]
        assert torch.equal(d, s) if 2 <= i < 11 else not d.any()
    assert not dst[0].any()  # other layers untouched
    assert len(descs[0]) == 3  # scattered pages: one run per page


def test_contiguous_pages_coalesce_into_one_descriptor():
    src, dst, rs, rd = regions()
    descs = copy_descriptors(0, 1, 12, rs, [1, 2, 3], rd, [4, 5, 6])
    assert descs[2] == [11 * 3] and len(descs[0]) == 1
    apply(src, dst, descs)
    assert torch.equal(dst[0, 17:28], src[0, 5:16])


def test_layout_fingerprint():
    a = KVLayout("DeepseekV3ForCausalLM", 3, (48,), "float32", 16)
    assert a.fingerprint == KVLayout("DeepseekV3ForCausalLM", 3, (48,), "float32", 16).fingerprint
    assert a.entry_bytes == 192
    b = KVLayout("DeepseekV3ForCausalLM", 3, (48,), "bfloat16", 16)
    assert a.fingerprint != b.fingerprint
    try:
        a.check_compatible(b)
    except LayoutMismatch as e:
        assert "bfloat16" in str(e) and "float32" in str(e)
    else:
        raise AssertionError("mismatch not detected")
