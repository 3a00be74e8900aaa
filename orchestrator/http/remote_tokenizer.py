"""A tokenizer that is code shipped with the model, run only with the operator's opt-in.

Kimi K2 ships no tokenizer.json: its tokenizer is a tiktoken-based class in the model directory
(`tokenization_kimi.py`, named by tokenizer_config.json's `auto_map`) that transformers loads with
`trust_remote_code=True`. That runs the directory's Python code in this process, so it happens
only behind `--trust-remote-code`. Chat prompts still go through `ChatTokenizer`'s guard: message
content is encoded with special-token strings taken as text, so no one can forge a turn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.http.tokenizer import ChatTemplateError, ChatTokenizer, Tokenizer, TokenizerError


class RemoteCodeTokenizer(ChatTokenizer):
    """transformers' AutoTokenizer with the model's own tokenizer class."""

    def __init__(self, model_dir: Path):
        try:
            import transformers  # only here: the orchestrator otherwise never loads it
        except ImportError:
            raise TokenizerError(
                f"the tokenizer of {model_dir} is code that needs transformers: pip install 'moeserve[tools]'"
            ) from None
        try:
            self._tok: Any = transformers.AutoTokenizer.from_pretrained(
                model_dir, trust_remote_code=True, local_files_only=True
            )
        except Exception as e:  # the model's own code: anything can go wrong in it
            raise TokenizerError(f"the tokenizer code of {model_dir} failed to load: {e!r}") from e
        cfg_path = model_dir / "config.json"
        vocab = json.loads(cfg_path.read_text()).get("vocab_size") if cfg_path.is_file() else None
        self.model_vocab_size = int(vocab or len(self._tok))
        self.special_texts = [str(t) for t in self._tok.all_special_tokens]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def _encode_as_text(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False, split_special_tokens=True))

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if not self._tok.chat_template:
            raise ChatTemplateError(
                "this model has no chat template; use /v1/completions with a plain prompt"
            )
        try:
            return str(
                self._tok.apply_chat_template(
                    messages, add_generation_prompt=add_generation_prompt, tokenize=False
                )
            )
        except Exception as e:  # jinja's errors and the template's raise_exception
            raise ChatTemplateError(f"the chat template rejected the messages: {e}") from e


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False) -> ChatTokenizer:
    """The model's tokenizer: its tokenizer.json, or, with the operator's opt-in, the tokenizer class
    that ships with it (tokenizer_config.json's `auto_map`)."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        return Tokenizer(model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    remote = (cfg.get("auto_map") or {}).get("AutoTokenizer")
    if not remote:
        raise TokenizerError(f"model directory {model_dir} has no tokenizer.json and no tokenizer class")
    if not trust_remote_code:
        code = remote[0] if isinstance(remote, list) else remote
        raise TokenizerError(
            f"model directory {model_dir} tokenizes with its own code ({code}); it runs only with "
            "--trust-remote-code (read the code first: it runs in this process)"
        )
    return RemoteCodeTokenizer(model_dir)
