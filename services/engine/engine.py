"""The offline engine: `Engine.from_pretrained(dir).generate(prompt_token_ids, params)`.

Like `vllm.LLM` / `sglang.Engine`, plus the step-level API a server drives: `add_request`,
`step` (one scheduler step; returns the requests that produced a token), `abort`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from services.engine.config import EngineConfig
from services.engine.handoff import EngineHandoff
from services.engine.model_runner import ModelRunner
from services.engine.page_pool import KVCache, KVStats, PagePool
from services.engine.prefix_cache import PrefixCache
from services.engine.request import InvalidRequestError, KVListener, RequestOutput
from services.engine.requests import RequestTable
from services.engine.sampling import SamplingParams
from services.engine.scheduler import Scheduler
from services.engine.stats import StepStats
from services.ep import ExpertParallel
from services.models import ModelConfig, load_model
from services.models.base import MoECausalLM

DEFAULT_KV_POOL_TOKENS = 32768


class Engine:
    """One DP rank's engine: model, paged KV cache, scheduler and sampler behind a request API."""

    def __init__(self, model: MoECausalLM, model_config: ModelConfig, config: EngineConfig):
        self.model = model
        self.model_config = model_config
        self.config = config
        entry = model_config.kv_entry_shape
        per_token = KVCache.bytes_per_token(model_config.num_layers, entry, config.torch_dtype)
        if config.kv_pool_bytes is not None:
            pool_tokens = config.kv_pool_bytes // per_token
        else:
            pool_tokens = config.kv_pool_tokens or DEFAULT_KV_POOL_TOKENS
        num_pages = pool_tokens // config.page_size
        if num_pages < 1:
            raise InvalidRequestError(
                f"KV pool of {pool_tokens} tokens holds no page of {config.page_size} tokens; grow the pool"
            )
        self.pool = PagePool(num_pages, config.page_size)
        self.kv = KVCache(
            model_config.num_layers, num_pages, config.page_size, entry, config.torch_dtype, config.device
        )
        self.max_model_len = min(
            config.max_model_len or model_config.max_position_embeddings, num_pages * config.page_size
        )
        self.prefix_cache = PrefixCache(self.pool) if config.prefix_cache else None
        self.scheduler = Scheduler(
            self.pool, config.max_num_seqs, config.max_prefill_tokens, self.prefix_cache
        )
        self.runner = ModelRunner(model, self.kv, config.page_size, config.device)
        self.eos_ids = frozenset(model_config.eos_token_ids)
        self.requests = RequestTable(
            self.scheduler, model_config.vocab_size, self.max_model_len, self.eos_ids, config.seed
        )
        self.handoff = EngineHandoff(self.requests, self.scheduler)
        """What a KV connector drives: remote requests, held pages (`services.engine.handoff`)."""
        self.stats = StepStats()
        """Step time, batch size and tokens per phase (engine thread; copy with `snapshot`)."""
        self.idle = True
        """The last `step` found no work (on any rank of an expert-parallel group)."""
        self.stopped = False
        """A rank of the group asked to stop at the last `step` (all ranks see it at the same step)."""

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        parallel: Callable[[ModelConfig], ExpertParallel] | None = None,
        report: Callable[[str], None] | None = None,
        **options: object,
    ) -> Engine:
        """Load `model_dir` (config.json, safetensors, tokenizer) with `EngineConfig` options.

        `parallel(model_config)` makes this engine one rank of an expert-parallel group;
        `report(line)` receives the progress of a long weight load.
        """
        config = EngineConfig.from_options(**options)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        model, model_config = load_model(
            model_dir, config.torch_dtype, config.device, parallel, report, fp8=config.fp8
        )
        return cls(model, model_config, config)

    # -- request API ---------------------------------------------------------------------------

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise `InvalidRequestError` with what to change if the request cannot run."""
        self.requests.validate(prompt_token_ids, params)

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        listener: KVListener | None = None,
    ) -> str:
        """Queue a request; `listener` watches its KV layer by layer and defers freeing its pages."""
        req = self.requests.new(prompt_token_ids, params or SamplingParams(), request_id)
        req.listener = listener
        self.requests.live[req.request_id] = req
        self.scheduler.add(req)
        return req.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its pages; None if it is unknown or already done."""
        req = self.requests.live.pop(request_id, None)
        if req is None:
            return None
        return self.requests.finish(req, "abort", [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def lockstep(self) -> bool:
        """One rank of a group whose MoE layers exchange tokens: all ranks step together."""
        return self.model.parallel.lockstep

    def must_step(self) -> bool:
        """Whether the driver must call `step` now: local work, or a group that steps together."""
        return self.lockstep or self.scheduler.has_work()

    def idle_wait(self) -> float | None:
        """How long the driver may wait for new work before the next `step` (None: until it comes)."""
        if self.scheduler.has_work() or (self.lockstep and not self.idle):
            return 0.0
        return self.model.parallel.idle_poll_s

    def step(self, stop: bool = False) -> list[RequestOutput]:
        """Run one scheduler step; returns an output for every request that produced a token.

        In an expert-parallel group this is a collective: if any rank has work, every rank runs
        one forward (an empty one where it has nothing), so each MoE exchange has all ranks.
        `idle` tells whether the group as a whole had nothing to do. `stop` asks the group to
        stop; `stopped` turns true on every rank at the same step once any rank asked.
        """
        for req in self.scheduler.reserve_remote():
            req.kv_source.on_pages(req.request_id, req.pages)  # type: ignore[union-attr]
        batch = self.scheduler.schedule()
        prefill = batch is not None and batch.phase == "prefill"
        work, self.stopped = self.model.parallel.group_has_work(batch is not None, stop, prefill)
        if self.model.parallel.switch_now:  # between steps, on every rank at once
            self.model.switch_placement()
        self.idle = not work
        if batch is None:
            if work:
                self.runner.idle()
            return []
        run = self.runner.prefill if batch.phase == "prefill" else self.runner.decode
        began = time.perf_counter()
        picks = run(batch)
        self.stats.record(batch.phase, time.perf_counter() - began, len(batch.requests), sum(batch.num_new))
        recorder = self.model.parallel.recorder
        if recorder is not None:
            recorder.end_step(sum(batch.num_new))
        outputs = []
        for req, n, pick in zip(batch.requests, batch.num_new, picks, strict=True):
            req.num_computed += n
            req.kv_reported = max(req.kv_reported, req.num_computed)
            if pick is None:
                continue  # a prompt chunk that did not reach the end of the prompt
            self.scheduler.to_decode(req)
            outputs.append(self.requests.took(req, pick.token, pick.logprob))
        return outputs

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results come back in prompt order."""
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompt_token_ids)
        else:
            params = list(sampling_params)
            if len(params) != len(prompt_token_ids):
                raise InvalidRequestError(
                    f"got {len(params)} sampling params for {len(prompt_token_ids)} prompts"
                )
        for prompt, p in zip(prompt_token_ids, params, strict=True):
            self.validate(prompt, p)  # all or nothing: no request is queued if one is bad
        ids = [self.add_request(prompt, p) for prompt, p in zip(prompt_token_ids, params, strict=True)]
        done: dict[str, RequestOutput] = {}
        # In an expert-parallel group, keep stepping until no rank has work: the other ranks'
        # MoE exchanges need this one even after its own requests are done.
        while len(done) < len(ids) or (self.lockstep and not self.idle):
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    # -- introspection -------------------------------------------------------------------------

    def expert_load(self) -> tuple[torch.Tensor, int, int]:
        """Tokens per logical expert per MoE layer over the recent window: (counts [L, E], tokens, steps)."""
        recorder = self.model.parallel.recorder
        if recorder is None:
            mc = self.model_config
            return torch.zeros(len(mc.moe_layers), mc.num_experts, dtype=torch.long), 0, 0
        return recorder.snapshot()

    def kv_stats(self) -> KVStats:
        cache = self.prefix_cache
        cached, evictable = (cache.num_cached, cache.num_evictable) if cache is not None else (0, 0)
        return KVStats(self.pool.page_size, self.pool.num_pages, self.pool.num_free, cached, evictable)

    @property
    def num_waiting(self) -> int:
        """Requests not in the running batch: queued, or on their way in by KV hand-off."""
        s = self.scheduler
        return len(s.waiting) + len(s.kv_waiting) + len(s.kv_transferring) + len(s.kv_ready)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)
