import torch

from services.models.attention import AttnBatch


def test_decode_builder_agrees_with_general_builder():
    tables = [[7, 2, 9], [4], [1, 3]]
    ctx_lens = [9, 2, 5]
    general = AttnBatch.build([1, 1, 1], ctx_lens, tables, page_size=4)
    decode = AttnBatch.build_decode(ctx_lens, tables, page_size=4, device="cpu")
    assert decode.decode and not general.decode
    for name in ("slot_mapping", "q_index", "kv_slots", "mask", "unpad_index", "last_index"):
        assert torch.equal(getattr(general, name), getattr(decode, name)), name
    # Token 8 of sequence 0 lives in its third page (9), offset 0.
    assert general.slot_mapping.tolist() == [9 * 4 + 0, 4 * 4 + 1, 3 * 4 + 0]


def test_prefill_chunk_mask_is_causal_with_offset():
    # A 3-token chunk after 2 cached tokens: query i sees keys 0..2+i.
    batch = AttnBatch.build([3], [5], [[0, 1]], page_size=4)
    assert batch.mask[0, 0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch.slot_mapping.tolist() == [2, 3, 4]
