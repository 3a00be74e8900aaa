"""The `deepep` backend inside a running EP2 engine, against the contract double (gloo on CPU).

Prefill steps go through DeepEP's normal mode, decode steps through its expanded layout; the
tokens must match the `torch` backend's on the same bf16 model, and no decode step may make a
MoE layer wait on the host (`HostSyncCounter`, which counts what would synchronise on CUDA).
"""

from __future__ import annotations

import sys

from services.engine import Engine, SamplingParams
from services.ep import ExpertParallel, ExpertPlacement, create
from services.tools.tiny import make_tiny_model
from tests.host_syncs import HostSyncCounter
from tests.ranks import run_ranks
from tests.services.ep.test_dispatcher import DOUBLES
from tests.services.ep.test_ep_engine import make_prompts

MOE_SCOPE = ("services.models.moe", "services.ep.")
"""Where a MoE layer's own host syncs would come from (the model's MoE block and the dispatchers)."""
STEP_SCOPE = ("services.",)
"""Everything moeserve does in a step (scheduling, sampling, the step agreement included)."""


def decode_rank(rank: int, world: int, model_dir: str, backend: str, counts: list[int]) -> dict:
    """Greedy generation on an EP group; per step, host syncs per MoE layer and in the whole step.

    Returns {"outputs": tokens per prompt, "syncs": {"expanded"|"normal"|"prefill": [(per layer,
    per step)]}}: decode steps by the layout their MoE layers used, and steps with a prefill.
    """
    if backend == "deepep":
        sys.path.insert(0, str(DOUBLES))
    options = dict(max_tokens_per_rank=64, decode_tokens_per_rank=8) if backend == "deepep" else {}
    dispatcher = create(backend, **options)

    def parallel(cfg):
        placement = ExpertPlacement.default(len(cfg.moe_layers), cfg.num_experts, cfg.num_experts, world)
        return ExpertParallel(placement, rank, dispatcher)

    engine = Engine.from_pretrained(
        model_dir, parallel=parallel, dtype="bfloat16", max_prefill_tokens=64, max_num_seqs=8, page_size=4
    )
    # DeepEP's buffer exists before the first forward, made in this (the rank's) thread.
    made_in = dispatcher._buffer.made_in if backend == "deepep" else "MainThread"  # type: ignore[attr-defined]
    prompts = make_prompts(sum(counts))[sum(counts[:rank]) : sum(counts[: rank + 1])]
    params = SamplingParams(max_tokens=5 + 4 * rank, temperature=0.0, ignore_eos=True)
    ids = {engine.add_request(p, params): i for i, p in enumerate(prompts)}
    outputs: dict[int, list[int]] = {}
    syncs: dict[str, list[tuple[float, int]]] = {"expanded": [], "normal": [], "prefill": []}
    while True:
        with HostSyncCounter(STEP_SCOPE) as step, HostSyncCounter(MOE_SCOPE) as moe:
            for out in engine.step():
                if out.finished:
                    outputs[ids[out.request_id]] = out.output_token_ids
        if not engine.idle:
            # Per MoE layer: the step's one agreement (`agree`, a CPU collective on GPUs) aside.
            per_layer = moe.excluding("agree") / len(engine.model_config.moe_layers)
            par = engine.model.parallel
            mode = "prefill" if par.group_prefill else "expanded" if par.expanded else "normal"
            syncs[mode].append((per_layer, step.total))
        if engine.idle:
            break
    return {"outputs": [outputs[i] for i in range(len(prompts))], "syncs": syncs, "buffer_made_in": made_in}


def test_deepep_decodes_through_the_expanded_layout_without_host_syncs(tmp_path):
    model = str(make_tiny_model(tmp_path / "ds256", "deepseek_v3", overrides={"hidden_size": 256}))
    counts = [2, 3]  # uneven: rank 1 decodes alone at the end, rank 0 joins with padded calls
    torch_ranks = run_ranks(2, decode_rank, model, "torch", counts)
    deepep_ranks = run_ranks(2, decode_rank, model, "deepep", counts)
    for rank, (ref, got) in enumerate(zip(torch_ranks, deepep_ranks, strict=True)):
        assert got["outputs"] == ref["outputs"], f"rank {rank}"
        assert got["buffer_made_in"] == "MainThread"  # at start-up, not inside a forward
        # Decode steps ran expanded, and none of their MoE layers read anything back to the host.
        assert len(got["syncs"]["expanded"]) >= 8, got["syncs"]
        assert {layer for layer, _ in got["syncs"]["expanded"]} == {0}, got["syncs"]
        assert got["syncs"]["prefill"] and not got["syncs"]["normal"], "only prefill steps run normal mode"
        # The torch backend needs its split sizes on the host, in every MoE layer of every step.
        assert ref["syncs"]["normal"] and min(layer for layer, _ in ref["syncs"]["normal"]) > 0, ref["syncs"]
        assert not ref["syncs"]["expanded"]
