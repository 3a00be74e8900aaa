import pytest
import torch

from services.engine import Engine, SamplingParams, SamplingParamsError
from services.engine.sampling import _filtered_probs, sample
from tests import oracle

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
    draws = [sample(probs.log()[None], [SamplingParams()], [0], [n])[0].token for n in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03)


def test_unseeded_requests_differ_but_engine_seed_reproduces(ds_dir):
    p = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    a = Engine.from_pretrained(ds_dir, seed=5).generate([PROMPT, PROMPT], p)
    b = Engine.from_pretrained(ds_dir, seed=5).generate([PROMPT, PROMPT], p)
    assert a[0].output_token_ids != a[1].output_token_ids
    assert [o.output_token_ids for o in a] == [o.output_token_ids for o in b]


def test_logprobs_are_the_models_own_and_follow_the_tokens(ds_dir):
    """Greedy with logprobs=3: each token's log-probability and top 3 equal transformers' log-softmax,
    chunk by chunk; with temperature and filters the log-probabilities stay the model's (unscaled)."""
    prompt = PROMPT
    out = Engine.from_pretrained(ds_dir).generate(
        [prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    )[0]
    expected = oracle.greedy_logprobs(ds_dir, prompt, 6)
    assert len(out.output_logprobs) == len(out.output_token_ids) == 6
    for tok, got, lp in zip(out.output_token_ids, out.output_logprobs, expected, strict=True):
        top = lp.topk(3)
        assert got.logprob == pytest.approx(float(lp[tok]), abs=1e-4)
        assert [t for t, _ in got.top] == top.indices.tolist()
        assert [v for _, v in got.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert got.top[0][0] == tok  # greedy: the chosen token is the most likely one

    hot = SamplingParams(max_tokens=4, temperature=1.7, top_k=5, seed=3, ignore_eos=True, logprobs=0)
    sampled = Engine.from_pretrained(ds_dir).generate([prompt], hot)[0]
    ids = prompt + sampled.output_token_ids
    model_lp = oracle.position_logprobs(ds_dir, ids)[len(prompt) - 1 : -1]  # what predicted each output
    assert len(sampled.output_logprobs) == 4
    for tok, got, lp in zip(sampled.output_token_ids, sampled.output_logprobs, model_lp, strict=True):
        assert got.top == ()
        assert got.logprob == pytest.approx(float(lp[tok]), abs=1e-4)
    plain = Engine.from_pretrained(ds_dir).generate([prompt], SamplingParams(max_tokens=2, temperature=0))[0]
    assert plain.output_logprobs == [] and plain.new_logprobs == []


def test_logprobs_out_of_range_are_refused():
    with pytest.raises(SamplingParamsError, match="logprobs must be"):
        SamplingParams(logprobs=21)
    with pytest.raises(SamplingParamsError, match="logprobs must be"):
        SamplingParams(logprobs=-1)


def test_any_64_bit_seed_samples_and_the_same_seed_reproduces(ds_dir):
    """Issue 27: a seed past 2^63 (or negative) once reached the engine's int64 noise counters and
    failed the whole step; seeds are taken modulo 2^63."""
    engine = Engine.from_pretrained(ds_dir)
    outs = {}
    for seed in (2**64 - 1, -1, 2**63 + 5, 5):
        p = SamplingParams(max_tokens=6, temperature=1.0, seed=seed, ignore_eos=True)
        outs[seed] = engine.generate([PROMPT], p)[0].output_token_ids
        assert len(outs[seed]) == 6
    assert outs[2**63 + 5] == outs[5]  # the same seed modulo 2^63
