"""Every request an engine knows, from its validation to its end (engine thread only).

Live requests by id; finished ones whose pages a KV listener still reads (`held`, freed by the
hand-off's `release`); pages taken out of use for good because a remote writer may still reach
them (`stranded`). The engine's step and the KV hand-off both end requests through here, so a
request ends one way whatever brought its last token.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from services.engine.request import FinishReason, InvalidRequestError, Request, RequestOutput
from services.engine.sampling import SamplingParams, TokenLogprob, draw_seed
from services.engine.scheduler import Scheduler


class RequestTable:
    """The requests of one engine, and how each one starts and ends."""

    def __init__(
        self, scheduler: Scheduler, vocab_size: int, max_model_len: int, eos_ids: frozenset[int], seed: int
    ):
        self.scheduler = scheduler
        self.vocab_size, self.max_model_len, self.eos_ids = vocab_size, max_model_len, eos_ids
        self.live: dict[str, Request] = {}
        self.held: dict[str, Request] = {}
        """Finished requests whose pages a KV listener still reads."""
        self.stranded: list[int] = []
        """Pages a remote writer may still reach: never reused."""
        self._ids = itertools.count()
        self._rng = torch.Generator().manual_seed(seed)

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise `InvalidRequestError` with what to change if the request cannot run."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt is empty; send at least one token")
        vocab = self.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {n} tokens but the context limit is {self.max_model_len} tokens "
                "(prompt + at least one generated token); shorten the prompt"
            )
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")

    def new(self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str | None) -> Request:
        """A validated request with a fresh id and its own sampler (nothing queued or allocated)."""
        self.validate(prompt_token_ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.live or request_id in self.held:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        return Request(request_id, list(prompt_token_ids), params, draw_seed(params, self._rng))

    def took(self, req: Request, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        """`req` has a new `token`: its output, and its end if that token ends it."""
        req.append(token, logprob)
        reason = self._stop_reason(req, token)
        if reason is None:
            return self.output(req, [token])
        del self.live[req.request_id]
        return self.finish(req, reason, [token])

    def finish(self, req: Request, reason: FinishReason, new: list[int]) -> RequestOutput:
        """End `req`: its pages go back (or stay held for its KV listener), the listener is told."""
        keep = req.listener is not None and bool(req.pages)
        self.scheduler.finish(req, reason, keep_pages=keep)
        out = self.output(req, new)
        if keep:
            self.held[req.request_id] = req
        if req.listener is not None:
            req.listener.on_finish(out)
        return out

    def _stop_reason(self, req: Request, tok: int) -> FinishReason | None:
        p = req.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
            return "stop"
        if len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def output(req: Request, new: list[int]) -> RequestOutput:
        return RequestOutput(
            req.request_id, list(req.prompt_ids), list(req.output_ids), req.finish_reason, new,
            req.cached_tokens, list(req.output_logprobs),
        )  # fmt: skip
