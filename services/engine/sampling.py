"""Sampling parameters and the batched sampler, on the logits' device.

A step's picks are computed where the logits are (greedy rows by argmax, the others by an
exponential race over their filtered distribution), and the host gets only what it needs: the
token ids and, for rows that ask, their log-probabilities, in one copy (`to_host`, the one place a
step waits for the device).

Randomness is counter-based: a sampled request's noise at its n-th token is a hash of (its seed,
n, the token id), the same on any device and whatever else is in the batch, so a seeded request
gives the same tokens alone or batched, and no generator object lives on the device. Requests
without a seed draw one from the engine's generator when they arrive.

Log-probabilities, when a request asks for them, are those of the model's own distribution
(log-softmax of the raw logits, before temperature and filters), as OpenAI and vLLM report them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from services.models.device import to_device

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


MASK32 = 0xFFFFFFFF
SEED_MASK = (1 << 63) - 1
"""Seeds are taken modulo 2^63 (any integer is a seed)."""


def draw_seed(params: SamplingParams, fallback: torch.Generator) -> int | None:
    """A sampled request's seed (its own, or one drawn from `fallback`); None for greedy ones."""
    if params.greedy:
        return None
    if params.seed is not None:
        return params.seed & SEED_MASK  # the device's int64 noise counters take any integer this way
    return int(torch.randint(0, 2**62, (1,), generator=fallback))


def to_host(*tensors: torch.Tensor) -> list[list]:  # type: ignore[type-arg]
    """The step's results as host lists: the one place a step waits for the device."""
    return [t.tolist() for t in tensors]


def sample(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None], positions: list[int]
) -> list[Sampled]:
    """logits: [B, V] fp32 on any device -> one pick per row (with its log-probability where the row
    asks). `seeds[i]`: row i's seed (None: greedy); `positions[i]`: how many tokens it has made."""
    tokens = logits.argmax(dim=-1)  # [B] greedy rows are done here
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:  # the rows' indices, seeds and positions reach the device in one copy
        vocab = logits.shape[1]
        index, state = to_device(
            [rows, [[(seeds[i] or 0) & SEED_MASK, positions[i]] for i in rows]], logits.device
        )
        (table,) = to_device([[_filter_row(params[i], vocab) for i in rows]], logits.device, np.float32)
        probs = _filtered(logits.index_select(0, index), table)  # [N, V]
        noise = _exponential(state[:, 0], state[:, 1], vocab)  # [N, V] ~ Exp(1)
        tokens = tokens.index_copy(0, index, (probs / noise).argmax(dim=-1))  # the exponential race
    asks = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not asks:
        (picked,) = to_host(tokens)
        return [Sampled(t) for t in picked]
    (index,) = to_device([asks], logits.device)
    lp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)  # [A, V]
    chosen = lp.gather(1, tokens.index_select(0, index)[:, None]).squeeze(1)  # [A]
    top = lp.topk(max(params[i].logprobs or 0 for i in asks), dim=-1)  # [A, k]
    picked, chosen_lp, top_ids, top_lp = to_host(tokens, chosen, top.indices, top.values)
    out = [Sampled(t) for t in picked]
    for row, i in enumerate(asks):
        k = params[i].logprobs or 0
        pairs = tuple(zip(top_ids[row][:k], top_lp[row][:k], strict=True))
        out[i] = Sampled(picked[i], TokenLogprob(chosen_lp[row], pairs))
    return out


def _filter_row(p: SamplingParams, vocab: int) -> list[float]:
    """A row's [temperature, top_k (the vocabulary when off), top_p, min_p], as `_filtered` takes them."""
    return [p.temperature, p.top_k if 0 < p.top_k < vocab else vocab, p.top_p, p.min_p]


def _filtered(logits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """logits: [N, V], table: [N, 4] (`_filter_row`) -> probabilities after temperature, top-k, top-p
    and min-p, row by row's own."""
    temperature, top_k, top_p, min_p = table.unbind(1)
    ordered, order = (logits / temperature[:, None]).sort(dim=-1, descending=True)  # [N, V]
    kth = ordered.gather(1, top_k.long()[:, None] - 1)  # [N, 1]
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))  # ties with the k-th stay
    probs = torch.softmax(ordered, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    drop = (before >= top_p[:, None]) & (top_p < 1.0)[:, None]  # the top token always survives
    probs = probs.masked_fill(drop, 0.0)
    probs = probs.masked_fill(probs < min_p[:, None] * probs[:, :1], 0.0)
    probs = torch.zeros_like(probs).scatter_(1, order, probs)
    return probs / probs.sum(-1, keepdim=True)


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row: logits [V] -> probabilities after temperature 1, top-k, top-p and min-p."""
    unit = SamplingParams(top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
    table = torch.tensor([_filter_row(unit, logits.shape[-1])], dtype=torch.float32, device=logits.device)
    return _filtered(logits[None].float(), table)[0]


def _exponential(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N] seeds and token positions -> [N, V] Exp(1) noise, a hash of (seed, position, token id)."""
    row = _mix(_mix((seeds & MASK32) ^ _mix(seeds >> 32 & MASK32)) ^ positions)  # [N]
    token = _mul32(torch.arange(vocab, device=seeds.device), 0x9E3779B9)  # [V]
    bits = _mix(row[:, None] ^ token[None, :]) >> 8  # [N, V] 24 random bits
    uniform = (bits.float() + 0.5) / float(1 << 24)  # in (0, 1), exactly
    return -torch.log(uniform)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x < 2^32 in int64, without overflowing: c in 16-bit halves."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16) & 0xFFFF) << 16)) & MASK32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values < 2^32."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)
