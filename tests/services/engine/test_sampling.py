import torch

from services.engine import Engine, SamplingParams
from services.engine.sampling import _filtered_probs, sample

PROMPT = [11, 12, 13, 14]


def test_seed_reproducible_and_seeds_differ(ds_dir):
    engine = Engine.from_pretrained(ds_dir)
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=42, ignore_eos=True)
    a = engine.generate([PROMPT], p)[0].output_token_ids
    b = engine.generate([PROMPT], p)[0].output_token_ids
    c = engine.generate([PROMPT], SamplingParams(max_tokens=16, temperature=1.0, seed=43, ignore_eos=True))
    assert a == b
    assert a != c[0].output_token_ids


def test_degenerate_filters_equal_greedy(ds_dir):
    engine = Engine.from_pretrained(ds_dir)
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    for kw in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        out = engine.generate(
            [PROMPT], SamplingParams(max_tokens=12, temperature=1.0, seed=1, ignore_eos=True, **kw)
        )
        assert out[0].output_token_ids == greedy.output_token_ids, kw


def test_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = _filtered_probs(logits, SamplingParams(top_p=0.8)) > 0
    assert kept.tolist() == [True, True, False, False]
    kept = _filtered_probs(logits, SamplingParams(top_k=3)) > 0
    assert kept.tolist() == [True, True, True, False]
    kept = _filtered_probs(logits, SamplingParams(min_p=0.25)) > 0
    assert kept.tolist() == [True, True, True, False]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    gen = torch.Generator().manual_seed(0)
    draws = [sample(probs.log()[None], [SamplingParams()], [gen])[0] for _ in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03)


def test_unseeded_requests_differ_but_engine_seed_reproduces(ds_dir):
    p = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    a = Engine.from_pretrained(ds_dir, seed=5).generate([PROMPT, PROMPT], p)
    b = Engine.from_pretrained(ds_dir, seed=5).generate([PROMPT, PROMPT], p)
    assert a[0].output_token_ids != a[1].output_token_ids
    assert [o.output_token_ids for o in a] == [o.output_token_ids for o in b]
