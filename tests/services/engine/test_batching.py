"""Continuous batching: requests joining and leaving at any step give exactly their solo tokens."""

import torch

from services.engine import Engine, SamplingParams

LENGTHS = [3, 41, 9, 17, 1, 64, 26, 5]


def make_prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def params_for(i: int) -> SamplingParams:
    # Half greedy, half seeded sampling; different lengths so requests leave at different steps.
    if i % 2:
        return SamplingParams(
            max_tokens=10 + 3 * i, temperature=0.9, top_p=0.9, seed=100 + i, ignore_eos=True
        )
    return SamplingParams(max_tokens=10 + 3 * i, temperature=0.0, ignore_eos=True)


def test_staggered_arrivals_are_batch_invariant(model_dir):
    solo_engine = Engine.from_pretrained(model_dir, page_size=4)
    prompts = make_prompts(solo_engine.model_config.vocab_size)
    solo = [solo_engine.generate([p], params_for(i))[0].output_token_ids for i, p in enumerate(prompts)]

    engine = Engine.from_pretrained(model_dir, page_size=4, max_prefill_tokens=16)
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 6: [5], 9: [6], 15: [7]}  # step -> prompt indices
    results: dict[str, list[int]] = {}
    ids: dict[int, str] = {}
    max_batch = 0
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i in arrivals.get(step, []):
            ids[i] = engine.add_request(prompts[i], params_for(i))
        max_batch = max(max_batch, engine.num_running)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.output_token_ids
        step += 1
    assert max_batch >= 4  # requests really shared steps
    for i in range(len(prompts)):
        assert results[ids[i]] == solo[i], f"prompt {i} differs when batched"
    assert engine.kv_stats().used_pages == 0  # free, or cached and evictable


def test_generate_batch_matches_solo(ds_dir):
    engine = Engine.from_pretrained(ds_dir)
    prompts = make_prompts(engine.model_config.vocab_size)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    batched = engine.generate(prompts, params)
    for p, out in zip(prompts, batched, strict=True):
        assert engine.generate([p], params)[0].output_token_ids == out.output_token_ids
