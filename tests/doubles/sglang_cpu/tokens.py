"""What the fake SGLang scheduler generates: a fixed function of the prompt, so a test knows the
reply (importable without SGLang, which patches transformers on import)."""

from __future__ import annotations

FIRST_ID = 16  # generated ids stay clear of the tiny tokenizers' special tokens


def token_at(input_ids: list[int], k: int, vocab: int) -> int:
    """The k-th generated token for a prompt. Each token follows from the one before it and its
    position, so a reply continued from the prompt plus its first j tokens (a migration) goes on
    with the same tokens: token_at(prompt + reply[:j], k - j) == token_at(prompt, k)."""
    last = input_ids[-1] if input_ids else 0
    for position in range(len(input_ids), len(input_ids) + k + 1):
        last = FIRST_ID + (last * 131 + 17 * position + 7) % (vocab - FIRST_ID)
    return last
