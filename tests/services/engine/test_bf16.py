"""bfloat16 on the CPU, both families end to end: CUDA's default dtype, checked where no GPU is.

The oracle is transformers in fp32: our bf16 logits must be no further from it than transformers'
own bf16 logits are (bf16 alone moves a tiny random MoE a lot: near-tied router scores flip)."""

import pytest
import torch
import transformers

from services.engine import Engine, SamplingParams
from services.models import load_model
from tests.services.engine.test_parity import prompts, run_prefill


@pytest.fixture(scope="module")
def oracles(model_dir):
    load = transformers.AutoModelForCausalLM.from_pretrained
    return load(model_dir, dtype=torch.float32).eval(), load(model_dir, dtype=torch.bfloat16).eval()


def test_bf16_logits_are_as_close_to_fp32_as_transformers_bf16(model_dir, oracles):
    """Summed over twelve prompts: one prompt alone swings either way with the router flips."""
    fp32, bf16 = oracles
    model, cfg = load_model(model_dir, dtype=torch.bfloat16)
    ours_err = their_err = 0.0
    for seed in range(3):
        for ids in prompts(cfg.vocab_size, seed):
            with torch.no_grad():
                ref = fp32(torch.tensor([ids])).logits[0]
                theirs = bf16(torch.tensor([ids])).logits[0].float()
            ours = run_prefill(model, cfg, ids, chunk=16).float()
            ours_err += (ours - ref).abs().mean().item()
            their_err += (theirs - ref).abs().mean().item()
    assert ours_err <= 1.3 * their_err, (ours_err, their_err)


def test_routers_take_the_activations_dtype_except_deepseeks_fp32_routing(model_dir):
    model, cfg = load_model(model_dir, dtype=torch.bfloat16)
    gates = {p.dtype for name, p in model.named_parameters() if ".gate." in name}
    # DeepSeek routes in fp32 (its reference and transformers do); Qwen3-MoE's gate is a bf16 linear.
    assert gates == ({torch.float32} if cfg.family == "deepseek_v3" else {torch.bfloat16})


def test_bf16_engine_generates_and_frees_every_page(model_dir):
    engine = Engine.from_pretrained(model_dir, dtype="bfloat16", max_prefill_tokens=16, page_size=4)
    ps = prompts(engine.model_config.vocab_size, seed=3)
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * 2 + [
        SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True, logprobs=2)
    ] * 2
    outs = engine.generate(ps, params)
    assert [len(o.output_token_ids) for o in outs] == [8] * 4
    assert all(len(o.output_logprobs) == 8 for o in outs[2:])
    assert engine.kv_stats().used_pages == 0
