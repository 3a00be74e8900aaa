"""Turns a scheduled batch into model inputs, runs the model and samples the next tokens."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from services.engine.page_pool import KVCache
from services.engine.request import Request
from services.engine.sampling import Sampled, sample
from services.engine.scheduler import ScheduledBatch
from services.models.attention import AttnBatch
from services.models.base import MoECausalLM
from services.models.device import DeviceMark, to_device


class ModelRunner:
    """Runs one scheduled batch through the model and samples its next tokens."""

    def __init__(self, model: MoECausalLM, kv: KVCache, page_size: int, device: torch.device | str):
        self.model = model
        self.kv = kv
        self.page_size = page_size
        self.device = torch.device(device)

    @torch.inference_mode()
    def prefill(self, batch: ScheduledBatch) -> list[Sampled | None]:
        """Compute prompt chunks; a token is sampled only for requests whose prompt is now complete."""
        return self._step(batch.requests, batch.num_new, decode=False)

    @torch.inference_mode()
    def decode(self, batch: ScheduledBatch) -> list[Sampled | None]:
        """Compute each request's last token and sample the next one."""
        return self._step(batch.requests, batch.num_new, decode=True)

    @torch.inference_mode()
    def idle(self) -> None:
        """No local work this step: join the group's MoE exchanges with zero tokens."""
        self.model.idle_forward()

    def _layer_hook(self, reqs: list[Request], num_new: list[int]) -> Callable[[int], None] | None:
        watched = [(r, n) for r, n in zip(reqs, num_new, strict=True) if r.listener is not None]
        if not watched:
            return None

        def after_layer(layer: int) -> None:
            written = DeviceMark(self.device)  # the layer's KV writes are queued up to here
            for req, n in watched:  # from what was last reported: a cached prefix goes with the first chunk
                end = req.num_computed + n
                if end > req.kv_reported:
                    req.listener.on_layer(layer, req.kv_reported, end, req.pages, written)  # type: ignore[union-attr]

        return after_layer

    def _step(self, reqs: list[Request], num_new: list[int], decode: bool) -> list[Sampled | None]:
        tokens: list[int] = []
        ctx_lens: list[int] = []
        for req, n in zip(reqs, num_new, strict=True):
            tokens += req.tokens(req.num_computed, req.num_computed + n)
            ctx_lens.append(req.num_computed + n)
        tables = [r.pages for r in reqs]
        build = AttnBatch.build_decode if decode else partial(AttnBatch.build, num_new)
        batch = build(ctx_lens, tables, self.page_size, self.device, tokens)  # one copy to the device
        assert batch.tokens is not None
        hidden = self.model(
            batch.tokens, batch.positions, batch, self.kv.layers, self._layer_hook(reqs, num_new)
        )

        done = [i for i, (r, c) in enumerate(zip(reqs, ctx_lens, strict=True)) if c == r.num_tokens]
        picks: list[Sampled | None] = [None] * len(reqs)
        if done:
            last = batch.last_index
            if len(done) < len(reqs):  # some prompts go on in the next chunk: their logits are not taken
                last = last.index_select(0, to_device([done], self.device)[0])
            logits = self.model.logits(hidden[last])  # [N, V] on the model's device
            rows = [reqs[i] for i in done]
            picked = sample(
                logits, [r.params for r in rows], [r.seed for r in rows], [len(r.output_ids) for r in rows]
            )
            for i, pick in zip(done, picked, strict=True):
                picks[i] = pick
        return picks
