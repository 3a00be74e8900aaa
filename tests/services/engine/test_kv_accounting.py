"""KV pages: every page comes back after finishes and aborts; exhaustion queues or preempts cleanly."""

from services.engine import Engine, SamplingParams
from services.engine.request import Phase

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def test_aborts_mid_run_return_every_page(ds_dir):
    engine = Engine.from_pretrained(ds_dir, page_size=4, max_prefill_tokens=8)
    initial = engine.kv_stats().free_pages
    ids = [engine.add_request(list(range(1, 1 + n)), GREEDY) for n in (5, 30, 12, 3, 25)]
    aborted = set()
    for step in range(40):
        engine.step()
        if step == 2:  # one mid-prefill (30 tokens at 8 per step), one waiting or decoding
            for rid in (ids[1], ids[3]):
                out = engine.abort(rid)
                assert out is not None and out.finish_reason == "abort"
                aborted.add(rid)
        if step == 6:
            assert engine.kv_stats().used_pages > 0  # still running: pages in use
            engine.abort(ids[4])
            aborted.add(ids[4])
        if not engine.has_unfinished():
            break
    assert not engine.has_unfinished()
    assert engine.abort(ids[0]) is None  # finished requests are gone
    stats = engine.kv_stats()  # every page is free, or cached and evictable
    assert stats.used_pages == 0 and stats.free_pages + stats.evictable_pages == initial


def test_abort_waiting_request(ds_dir):
    engine = Engine.from_pretrained(ds_dir, max_num_seqs=1)
    a = engine.add_request([1, 2, 3], GREEDY)
    b = engine.add_request([4, 5, 6], GREEDY)
    engine.step()
    assert engine.num_waiting == 1
    assert engine.abort(b).finish_reason == "abort"
    assert engine.num_waiting == 0
    while engine.has_unfinished():
        engine.step()
    assert engine.kv_stats().used_pages == 0
    assert engine.abort(a) is None


def test_exhausted_pool_queues_then_preempts_without_corruption(ds_dir):
    """A pool too small for all requests at once: same tokens as a roomy pool, no page leaked."""
    prompts = [list(range(10 + i, 30 + i)) for i in range(6)]
    roomy = Engine.from_pretrained(ds_dir, page_size=4)
    expected = [o.output_token_ids for o in roomy.generate(prompts, GREEDY)]

    tight = Engine.from_pretrained(ds_dir, page_size=4, kv_pool_tokens=64)  # 16 pages, 3 full requests
    ids = [tight.add_request(p, GREEDY) for p in prompts]
    queued_seen = False
    results = {}
    while tight.has_unfinished():
        for out in tight.step():
            if out.finished:
                results[out.request_id] = out.output_token_ids
        queued_seen |= (
            any(r.phase is Phase.WAITING for r in tight.scheduler.waiting) and tight.num_running > 0
        )
        assert tight.kv_stats().free_pages >= 0
    assert queued_seen
    assert tight.scheduler.num_preemptions > 0
    assert [results[i] for i in ids] == expected
    assert tight.kv_stats().used_pages == 0


def test_kv_pool_in_bytes(ds_dir):
    engine = Engine.from_pretrained(ds_dir, page_size=16, kv_pool_bytes=1 << 20)
    cfg = engine.model_config
    per_token = cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert engine.kv_stats().total_pages == (1 << 20) // per_token // 16
