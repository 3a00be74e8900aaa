"""What the fake SGLang scheduler generates: a fixed function of the prompt, so a test knows the
reply (importable without SGLang, which patches transformers on import)."""

from __future__ import annotations

FIRST_ID = 16  # generated ids stay clear of the tiny tokenizers' special tokens


def token_at(input_ids: list[int], k: int, vocab: int) -> int:
    """The k-th generated token for a prompt."""
    return FIRST_ID + (sum(input_ids) * 131 + 17 * k + 7) % (vocab - FIRST_ID)
