"""Sampling parameters and the per-request sampler.

Every non-greedy request owns a `torch.Generator` (seeded from `seed` when given), and draws the
same amount of randomness per step whatever else is in the batch, so a seeded request gives the
same tokens alone or batched.

Log-probabilities, when a request asks for them, are those of the model's own distribution
(log-softmax of the raw logits, before temperature and filters), as OpenAI and vLLM report them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

MAX_TOP_LOGPROBS = 20
"""The most alternatives a request may ask for per token (OpenAI's limit)."""


class SamplingParamsError(ValueError):
    """Sampling parameters out of range; the message says which and what is allowed."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request (the fields OpenAI and vLLM users know)."""

    max_tokens: int = 16
    """Most tokens to generate (>= 1)."""
    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it (0 < t <= 100)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's, in [0, 1]."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (the stop token is kept in the output ids)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence tokens."""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: each token's, with the k most likely alternatives."""

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise SamplingParamsError(msg)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            bad(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad(f"seed must be an integer, got {self.seed!r}")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            bad(f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and the most likely tokens at its position."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability), most likely first."""


class Sampled(NamedTuple):
    """One request's pick at one step: the token, and its log-probability when asked for."""

    token: int
    logprob: TokenLogprob | None = None


def make_generator(params: SamplingParams, fallback: torch.Generator) -> torch.Generator | None:
    """A private generator for a sampling request; None for greedy ones."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=fallback))
    return torch.Generator().manual_seed(seed)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[Sampled]:
    """logits: [B, V] fp32 -> one pick per row (with its log-probability where the row asks)."""
    out = logits.argmax(dim=-1).tolist()  # greedy rows are done here
    for i, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        probs = _filtered_probs(logits[i] / p.temperature, p)  # [V]
        # Exponential race: argmax(p / q), q ~ Exp(1), is a draw from `probs`.
        q = torch.empty_like(probs).exponential_(generator=gen)
        out[i] = int((probs / q).argmax())
    picks = zip(out, params, strict=True)
    return [Sampled(tok, _logprob(logits[i], tok, p.logprobs)) for i, (tok, p) in enumerate(picks)]


def _logprob(logits: torch.Tensor, token: int, k: int | None) -> TokenLogprob | None:
    """logits: [V] -> `token`'s log-probability and the k most likely tokens' (None if k is None)."""
    if k is None:
        return None
    lp = torch.log_softmax(logits.float(), dim=-1)
    if not k:
        return TokenLogprob(float(lp[token]))
    top = lp.topk(k)
    return TokenLogprob(float(lp[token]), tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)))


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits: [V] -> probabilities after top-k, top-p and min-p."""
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
        drop = before >= p.top_p  # the top token always survives
        probs = probs.scatter(0, idx, sorted_p.masked_fill(drop, 0.0))
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs / probs.sum()
