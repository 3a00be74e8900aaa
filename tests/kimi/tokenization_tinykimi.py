"""A Kimi-K2-style tokenizer, written for moeserve's tests: tiktoken byte-pair encoding whose ranks
live in `tiktoken.model`, special tokens numbered after them, as a transformers tokenizer class
that ships with the model (tokenizer_config.json's `auto_map`) and so loads only with
`trust_remote_code=True`. It has the shape of Kimi K2's `tokenization_kimi.py`, not its code."""

from __future__ import annotations

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from transformers import PreTrainedTokenizer

PATTERN = r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = (
    "[BOS]",
    "[EOS]",
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
)


class TinyKimiTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tiktoken.model"}  # noqa: RUF012 (transformers reads them so)
    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012

    def __init__(self, vocab_file: str, bos_token: str = "[BOS]", eos_token: str = "[EOS]", **kwargs):
        ranks = load_tiktoken_bpe(vocab_file)
        self.special_ids = {t: len(ranks) + i for i, t in enumerate(SPECIALS)}
        self.model = tiktoken.Encoding(
            name="tinykimi", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=self.special_ids
        )
        self.pieces = {rank: piece for piece, rank in ranks.items()}
        kwargs.pop("extra_special_tokens", None)
        kwargs.pop("additional_special_tokens", None)
        extra = [t for t in SPECIALS if t not in (bos_token, eos_token)]
        super().__init__(bos_token=bos_token, eos_token=eos_token, extra_special_tokens=extra, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.model.n_vocab

    def get_vocab(self) -> dict[str, int]:
        return {self._convert_id_to_token(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # Special-token strings in `text` are plain text here: transformers splits them off before.
        return [str(i) for i in self.model.encode(text, disallowed_special=())]

    def _convert_token_to_id(self, token: str) -> int:
        return self.special_ids[token] if token in self.special_ids else int(token)

    def _convert_id_to_token(self, index: int) -> str:
        names = {i: t for t, i in self.special_ids.items()}
        return names.get(index, str(index))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Ids past the ranks and specials decode to nothing (Kimi K2 reserves its spare ids).
        data = b"".join(t.encode() if t in self.special_ids else self.pieces.get(int(t), b"") for t in tokens)
        return data.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()
