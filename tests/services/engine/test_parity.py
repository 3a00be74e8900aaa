"""Exactness against `transformers` (fp32, CPU): prefill logits and greedy continuations."""

import json
import shutil

import pytest
import torch
import transformers

from services.engine import Engine, SamplingParams
from services.models import load_model
from services.models.attention import AttnBatch

PROMPT_LENGTHS = [1, 7, 33, 90]


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def oracle(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def run_prefill(
    model, cfg, ids: list[int], chunk: int, page_size: int = 4, device: str = "cpu"
) -> torch.Tensor:
    """Logits of every prompt position, computed chunk by chunk through the paged cache."""
    n = len(ids)
    pages = list(range(-(-n // page_size)))[::-1]  # deliberately non-contiguous page order
    dtype = model.lm_head.weight.dtype
    caches = [
        torch.zeros(len(pages) * page_size, *cfg.kv_entry_shape, dtype=dtype, device=device)
        for _ in range(cfg.num_layers)
    ]
    out = []
    with torch.inference_mode():
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            batch = AttnBatch.build([end - start], [end], [pages], page_size, device)
            tokens, positions = (
                torch.tensor(ids[start:end], device=device),
                torch.arange(start, end, device=device),
            )
            hidden = model(tokens, positions, batch, caches)
            out.append(model.logits(hidden))
    return torch.cat(out)


@pytest.mark.parametrize("chunk", [1000, 5])
def test_prefill_logits_match_transformers(model_dir, oracle, chunk):
    model, cfg = load_model(model_dir)
    for ids in prompts(cfg.vocab_size):
        with torch.no_grad():
            ref = oracle(torch.tensor([ids])).logits[0]
        ours = run_prefill(model, cfg, ids, chunk)
        assert (ours - ref).abs().max().item() < 1e-4


def test_greedy_32_tokens_match_transformers_generate(model_dir, oracle):
    engine = Engine.from_pretrained(model_dir, max_prefill_tokens=32, page_size=8)
    ps = prompts(engine.model_config.vocab_size, seed=1)
    outs = engine.generate(ps, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    for ids, out in zip(ps, outs, strict=True):
        t = torch.tensor([ids])
        ref = oracle.generate(
            t, attention_mask=torch.ones_like(t), max_new_tokens=32, do_sample=False, eos_token_id=None
        )[0, len(ids) :].tolist()
        assert len(ref) == 32
        assert out.output_token_ids == ref
        assert out.finish_reason == "length"
    assert engine.kv_stats().used_pages == 0  # free, or cached and evictable


def test_eos_and_stop_token_ids_stop_like_transformers(model_dir, tmp_path):
    """With the model's EOS (from config.json) in the greedy path, both stop at the same token."""
    prompt = [3, 4, 5]
    free = Engine.from_pretrained(model_dir).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    )[0]
    eos = free.output_token_ids[3]
    eos_dir = tmp_path / "eos"
    shutil.copytree(model_dir, eos_dir)
    raw = json.loads((eos_dir / "config.json").read_text())
    raw["eos_token_id"] = eos
    (eos_dir / "config.json").write_text(json.dumps(raw))
    (eos_dir / "generation_config.json").unlink()

    (out,) = Engine.from_pretrained(eos_dir).generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(eos_dir, dtype=torch.float32).eval()
    t = torch.tensor([prompt])
    ref = hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=8, do_sample=False)[0, 3:]
    assert out.finish_reason == "stop"
    assert (
        out.output_token_ids == ref.tolist() == free.output_token_ids[: free.output_token_ids.index(eos) + 1]
    )

    # stop_token_ids end generation the same way, EOS or not.
    stop = free.output_token_ids[2]
    (out,) = Engine.from_pretrained(model_dir).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop,), ignore_eos=True)
    )
    assert out.finish_reason == "stop" and out.output_token_ids[-1] == stop


@pytest.mark.gpu
def test_bf16_cuda_parity(model_dir):
    """On a GPU: bf16 greedy tokens match transformers bf16 for the first 16 tokens."""
    oracle = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    engine = Engine.from_pretrained(model_dir, dtype="bfloat16", device="cuda")
    ps = prompts(engine.model_config.vocab_size, seed=2)
    outs = engine.generate(ps, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for ids, out in zip(ps, outs, strict=True):
        with torch.no_grad():
            t = torch.tensor([ids]).cuda()
            ref = oracle.generate(
                t, attention_mask=torch.ones_like(t), max_new_tokens=16, do_sample=False, eos_token_id=None
            )[0, len(ids) :].tolist()
        assert out.output_token_ids == ref
