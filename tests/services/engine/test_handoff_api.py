"""The engine hooks a KV hand-off uses, exercised in one process: a prefill engine's listener
copies each layer's KV into pages reserved on a decode engine, which then continues alone."""

from collections.abc import Sequence

import pytest

from services.engine import Engine, InvalidRequestError, RequestOutput, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def reserve_pages(engine: Engine, num_tokens: int) -> list[int] | None:
    """Pages for `num_tokens` of KV written from elsewhere, outside the scheduler; None if full."""
    need = engine.pool.pages_for(num_tokens)
    return engine.pool.allocate(need) if need <= engine.pool.num_available else None


def add_prefilled_request(
    engine: Engine, prompt: Sequence[int], first_token: int, pages: list[int], params: SamplingParams
) -> RequestOutput:
    """Admit a request whose prompt KV is already in `pages` (from `reserve_pages`) and whose first
    token was sampled elsewhere, as a KV hand-off does; the pages are the request's (freed when it
    ends, also on error)."""
    try:
        req = engine.requests.new(prompt, params, None)
        if len(pages) < engine.pool.pages_for(len(prompt)):
            raise InvalidRequestError(f"{len(pages)} pages cannot hold a {len(prompt)}-token prompt")
    except InvalidRequestError:
        engine.pool.free(pages)
        raise
    req.pages, req.num_computed = pages, len(prompt)
    engine.requests.live[req.request_id] = req
    out = engine.requests.took(req, first_token, None)
    if not out.finished:
        engine.scheduler.add_ready(req)
    return out


class CopyListener:
    """Copies KV layer by layer from the prefill engine's pages into the decode engine's pages."""

    def __init__(self, src: Engine, dst: Engine, dst_pages: list[int]):
        self.src, self.dst, self.dst_pages = src, dst, dst_pages
        self.layers_seen: list[tuple[int, int, int]] = []
        self.output = None

    def on_layer(self, layer, start, end, pages, written):
        ps = self.src.pool.page_size
        for i in range(start, end):
            s = pages[i // ps] * ps + i % ps
            d = self.dst_pages[i // ps] * ps + i % ps
            self.dst.kv.layers[layer][d] = self.src.kv.layers[layer][s]
        self.layers_seen.append((layer, start, end))

    def on_finish(self, output):
        self.output = output


def test_prefill_listener_then_prefilled_decode_matches_one_engine(model_dir):
    prompt = list(range(3, 40))
    (expected,) = Engine.from_pretrained(model_dir).generate([prompt], GREEDY)

    prefill = Engine.from_pretrained(model_dir, page_size=4, max_prefill_tokens=16)
    decode = Engine.from_pretrained(model_dir, page_size=4, kv_pool_tokens=256)
    pages = reserve_pages(decode, len(prompt))
    assert pages is not None and decode.kv_stats().used_pages == len(pages)

    listener = CopyListener(prefill, decode, pages)
    rid = prefill.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0), listener=listener)
    while prefill.has_unfinished():
        prefill.step()
    # Chunked prefill (16 tokens per step): every layer reported for each chunk, in order.
    layers = prefill.model_config.num_layers
    assert [(s, e) for (_, s, e) in listener.layers_seen[::layers]] == [(0, 16), (16, 32), (32, 37)]
    assert listener.output.finish_reason == "length"
    first = listener.output.output_token_ids[0]
    # The listener holds the prefill pages until released.
    assert len(prefill.requests.held) == 1 and prefill.kv_stats().used_pages > 0
    assert prefill.handoff.release(rid) and prefill.kv_stats().used_pages == 0
    assert not prefill.handoff.release(rid)

    out = add_prefilled_request(decode, prompt, first, pages, GREEDY)
    tokens = [first]
    while decode.has_unfinished():
        for o in decode.step():
            tokens += o.new_token_ids
    assert tokens == expected.output_token_ids
    assert out.new_token_ids == [first]
    assert decode.kv_stats().used_pages == 0


def test_abort_with_listener_holds_pages_until_release(ds_dir):
    engine = Engine.from_pretrained(ds_dir, page_size=4, max_prefill_tokens=8)
    listener = CopyListener(engine, engine, list(range(100, 110)))
    listener.on_layer = lambda *a: None
    rid = engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=1), listener=listener)
    engine.step()  # first chunk computed: pages in use, maybe being read remotely
    engine.abort(rid)
    assert listener.output.finish_reason == "abort"
    assert engine.kv_stats().used_pages > 0
    engine.handoff.release(rid)
    assert engine.kv_stats().used_pages == 0


def test_reservation_fails_cleanly_when_full_and_prefilled_stop_frees(ds_dir):
    engine = Engine.from_pretrained(ds_dir, page_size=4, kv_pool_tokens=32)
    assert reserve_pages(engine, 33) is None
    pages = reserve_pages(engine, 10)
    eos = engine.model_config.eos_token_ids[0]
    out = add_prefilled_request(engine, list(range(10)), eos, pages, SamplingParams(max_tokens=5))
    assert out.finish_reason == "stop" and engine.kv_stats().used_pages == 0
    pages = reserve_pages(engine, 10)
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        add_prefilled_request(engine, [], 1, pages, SamplingParams())
    assert engine.kv_stats().used_pages == 0  # the reserved pages went back with the error


class ReservedPages:
    """KVSource that records the pages the scheduler reserved; the test plays the transfer."""

    def __init__(self):
        self.pages: dict[str, list[int]] = {}

    def on_pages(self, request_id, pages):
        self.pages[request_id] = pages


def test_hand_off_requests_wait_for_seats_under_max_num_seqs(ds_dir):
    """More hand-off requests than max_num_seqs: the extra wait for pages and seats, all finish exactly."""
    prompts = [list(range(3 + i, 30 + 2 * i)) for i in range(5)]
    expected = Engine.from_pretrained(ds_dir).generate(prompts, GREEDY)
    prefill = Engine.from_pretrained(ds_dir, page_size=4)
    decode = Engine.from_pretrained(ds_dir, page_size=4, max_num_seqs=2)
    source = ReservedPages()
    ids = [decode.handoff.add_remote_request(p, GREEDY, f"r{i}", source) for i, p in enumerate(prompts)]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    running, in_transfer, queued = [], [], []
    while decode.has_unfinished() or source.pages:
        for out in decode.step():
            tokens[out.request_id] += out.new_token_ids
        sched = decode.scheduler
        running.append(len(sched.running))
        in_transfer.append(len(sched.kv_transferring) + len(sched.kv_ready))
        queued.append(len(sched.kv_waiting))
        for rid, pages in list(source.pages.items()):  # prefill computes the prompt, KV lands in `pages`
            del source.pages[rid]
            listener = CopyListener(prefill, decode, pages)
            pid = prefill.add_request(
                prompts[ids.index(rid)], SamplingParams(max_tokens=1, temperature=0.0), listener=listener
            )
            while prefill.has_unfinished():
                prefill.step()
            prefill.handoff.release(pid)
            out = decode.handoff.kv_arrived(rid, listener.output.output_token_ids[0])
            tokens[rid] += out.new_token_ids
    assert max(running) == 2 and max(in_transfer) == 2  # never more than max_num_seqs
    assert queued[0] == 3  # the extra requests waited without pages
    assert [tokens[rid] for rid in ids] == [e.output_token_ids for e in expected]
    assert decode.kv_stats().used_pages == 0 and not decode.has_unfinished()
    assert not decode.handoff.kv_arrived("r0", 1)  # a finished request takes no KV
