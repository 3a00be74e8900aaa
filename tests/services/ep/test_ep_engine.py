"""Expert-parallel engines on real processes (gloo): exact against one process and transformers."""

from __future__ import annotations

import pytest
import torch
import transformers

from services.engine import Engine, SamplingParams
from services.ep import ExpertLoadRecorder, ExpertParallel, ExpertPlacement, create
from tests.ranks import run_ranks

PARAMS = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)


def make_prompts(n: int, vocab: int = 480) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [
        torch.randint(0, vocab, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def ep_rank(
    rank: int, world: int, model_dir: str, slots: int, assignment: list[list[int]], abort_at: int | None
):
    dispatcher = create("torch")

    def parallel(cfg):
        placement = ExpertPlacement.default(len(cfg.moe_layers), cfg.num_experts, slots, world)
        return ExpertParallel(
            placement, rank, dispatcher, ExpertLoadRecorder(len(cfg.moe_layers), cfg.num_experts)
        )

    engine = Engine.from_pretrained(model_dir, parallel=parallel, max_prefill_tokens=24, page_size=4)
    prompts = make_prompts(sum(len(a) for a in assignment))
    ids = {engine.add_request(prompts[i], PARAMS, request_id=f"p{i}"): i for i in assignment[rank]}
    outputs: dict[int, list[int]] = {}
    steps = tokens = 0
    aborted = None
    while True:
        if abort_at is not None and steps == abort_at and rank == world - 1 and ids:
            aborted = next(iter(ids))
            engine.abort(aborted)
        for out in engine.step():
            if out.finished and out.finish_reason != "abort":
                outputs[ids[out.request_id]] = out.output_token_ids
        steps += 1
        if engine.idle:
            break
    counts, tokens, _ = engine.expert_load()
    k = engine.model_config.num_experts_per_tok
    return {
        "outputs": outputs,
        "aborted": ids.get(aborted) if aborted else None,
        # Per layer, tokens x top-k choices; a rank without requests computed (and counted) nothing.
        "load_ok": bool((counts.sum(1) == tokens * k).all()) and (tokens > 0) == bool(ids),
        "free": engine.kv_stats().used_pages == 0,
        "local_slots": engine.model.parallel.placement.slots_per_rank,
    }


def ep_generate(rank: int, world: int, model_dir: str, counts: list[int]) -> list[list[int]]:
    """The offline API on every rank, with different amounts of work per rank."""
    dispatcher = create("torch")

    def parallel(cfg):
        placement = ExpertPlacement.default(len(cfg.moe_layers), cfg.num_experts, cfg.num_experts, world)
        return ExpertParallel(placement, rank, dispatcher)

    engine = Engine.from_pretrained(model_dir, parallel=parallel)
    prompts = make_prompts(sum(counts))[sum(counts[:rank]) : sum(counts[: rank + 1])]
    short = SamplingParams(max_tokens=2 + 10 * rank, temperature=0.0, ignore_eos=True)
    return [o.output_token_ids for o in engine.generate(prompts, short)]


def test_generate_on_every_rank_returns_when_the_group_is_done(model_dirs):
    """Rank 0 finishes first (fewer tokens, fewer prompts); it must keep joining rank 1's steps."""
    model = str(model_dirs["deepseek_v3"])
    results = run_ranks(2, ep_generate, model, [1, 3])
    expected = Engine.from_pretrained(model).generate(
        make_prompts(4),
        [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (2, 12, 12, 12)],
    )
    assert [*results[0], *results[1]] == [o.output_token_ids for o in expected]


@pytest.fixture(scope="module")
def references(model_dirs):
    """Single-process engine and transformers greedy tokens for the shared prompt list."""
    refs = {}
    for name in ("deepseek_v3", "qwen3_moe"):
        prompts = make_prompts(8)
        engine = Engine.from_pretrained(model_dirs[name])
        ours = [o.output_token_ids for o in engine.generate(prompts, PARAMS)]
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dirs[name], dtype=torch.float32).eval()
        theirs = []
        for p in prompts:
            t = torch.tensor([p])
            g = hf.generate(
                t, attention_mask=torch.ones_like(t), max_new_tokens=14, do_sample=False, eos_token_id=None
            )
            theirs.append(g[0, len(p) :].tolist())
        assert ours == theirs
        refs[name] = ours
    return refs


@pytest.mark.parametrize(
    "name, world, slots, assignment, abort_at",
    [
        # EP2, 16 experts in 18 slots; rank 0 has all the work, rank 1 only joins the exchanges.
        ("deepseek_v3", 2, 18, [[0, 1, 2, 3, 4, 5, 6, 7], []], None),
        # EP4, 16 experts in 20 slots; uneven work, one request aborted on the last rank.
        ("deepseek_v3", 4, 20, [[0, 1, 2], [3], [4, 5], [6, 7]], 3),
        ("qwen3_moe", 2, 20, [[0, 2, 4, 6], [1, 3, 5, 7]], None),
        ("qwen3_moe", 4, 16, [[0, 1], [2, 3], [4, 5], [6, 7]], None),
    ],
)
def test_expert_parallel_engines_are_exact(model_dirs, references, name, world, slots, assignment, abort_at):
    results = run_ranks(world, ep_rank, str(model_dirs[name]), slots, assignment, abort_at)
    got: dict[int, list[int]] = {}
    aborted = set()
    for res in results:
        got.update(res["outputs"])
        if res["aborted"] is not None:
            aborted.add(res["aborted"])
        assert res["load_ok"], "expert load counts must sum to tokens x top-k per layer"
        assert res["free"], "every KV page must be back in the pool"
        assert res["local_slots"] == slots // world
    expected = references[name]
    for i in range(8):
        if i in aborted:
            assert i not in got
        else:
            assert got[i] == expected[i], f"prompt {i} differs under EP{world}"
    assert len(aborted) == (1 if abort_at is not None else 0)
