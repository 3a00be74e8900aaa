"""transformers' own greedy decoding: the correctness oracle for text that comes out of the API."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
import transformers


@cache
def _load(model_dir: str):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tok, model


def chat_ids(model_dir: Path, messages: list[dict]) -> list[int]:
    tok, _ = _load(str(model_dir))
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def greedy(model_dir: Path, prompt_ids: list[int], max_new: int) -> tuple[str, str]:
    """(text, finish_reason) of transformers' greedy continuation, special tokens skipped."""
    tok, model = _load(str(model_dir))
    ids = torch.tensor([prompt_ids])
    # An explicit mask: without it, transformers masks every token equal to pad_token_id.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
    new = out[0, len(prompt_ids) :].tolist()
    reason = "stop" if new and new[-1] == model.config.eos_token_id else "length"
    return tok.decode(new, skip_special_tokens=True), reason


def encode(model_dir: Path, text: str) -> list[int]:
    return _load(str(model_dir))[0].encode(text)


def greedy_ids(model_dir: Path, prompt_ids: list[int], max_new: int) -> list[int]:
    """transformers' greedy continuation as token ids (ending with EOS where it stopped)."""
    _, model = _load(str(model_dir))
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def greedy_logprobs(model_dir: Path, prompt_ids: list[int], max_new: int) -> list[torch.Tensor]:
    """The log-softmax of transformers' logits at each step of its greedy continuation ([V] each)."""
    _, model = _load(str(model_dir))
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    return [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits]


def position_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax after each token of `ids` ([len(ids), V]): one forward, no sampling."""
    _, model = _load(str(model_dir))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
    return torch.log_softmax(logits[0].float(), dim=-1)
