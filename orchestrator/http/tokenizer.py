"""The model directory's tokenizer and chat template, without torch or transformers.

Chat templates render the way `transformers` renders them (sandboxed Jinja with trim_blocks and
lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`), so prompts tokenize identically.
A tokenizer that is code shipped with the model (Kimi K2's tiktoken one: `auto_map` in
tokenizer_config.json, no tokenizer.json) runs only when the operator opts in
(`--trust-remote-code`; `remote_tokenizer.py`, whose `load_tokenizer` picks between the two).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer


class TokenizerError(ValueError):
    """The model directory's tokenizer or chat template cannot be used."""


class ChatTemplateError(ValueError):
    """The messages cannot be rendered with the model's chat template."""


def _token_text(value: str | dict[str, Any] | None) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class ChatTokenizer(ABC):
    """What the HTTP edge needs of a tokenizer: ids from text and chat messages, text from ids, and
    the ids that end an assistant's turn. Subclasses tokenize; the chat template's safety is here."""

    model_vocab_size: int
    """Token ids the model takes (config.json's vocab_size; the tokenizer's when absent)."""
    special_texts: list[str]

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def _encode_as_text(self, text: str) -> list[int]:
        """`text` tokenized with special-token strings taken as plain text."""

    @abstractmethod
    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        """The chat template's text for `messages`; ChatTemplateError if it rejects them."""

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """The prompt's ids. Message content never becomes special tokens: text such as
        `<|end_of_text|><|assistant|>` in a user turn stays text (only the template's own markup
        is special), so no one can forge a turn. Other prompts tokenize as transformers does."""
        text = self._render(messages, add_generation_prompt)
        contents = [str(m.get("content") or "") for m in messages]
        spelled = [t for t in self.special_texts if any(t in c for c in contents)]
        if not spelled:
            return self.encode(text, add_special_tokens=False)
        # Some content spells special tokens: find where each content sits in the text by
        # rendering placeholders, then encode the template's parts with markup and the content as text.
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        marked = self._render(
            [{**m, "content": k} for m, k in zip(messages, marks, strict=True)], add_generation_prompt
        )
        pieces, pos = [], 0
        for match in re.finditer("\ue000(\\d+)\ue001", marked):
            pieces.append((marked[pos : match.start()], True))
            pieces.append((contents[int(match.group(1))], False))
            pos = match.end()
        pieces.append((marked[pos:], True))
        if "".join(p for p, _ in pieces) != text:
            raise ChatTemplateError(
                f"a message contains special-token text ({spelled[0]!r}) that this model's chat "
                "template would read as markup; remove it"
            )
        ids: list[int] = []
        for piece, markup in pieces:
            if piece:
                ids += self.encode(piece, add_special_tokens=False) if markup else self._encode_as_text(piece)
        return ids

    @functools.cached_property
    def turn_end_ids(self) -> tuple[int, ...]:
        """The special token the chat template closes an assistant's turn with (`<|im_end|>`,
        `<|eot_id|>`, ...), found by rendering one: generation stops there whatever config.json's
        eos_token_id says (Kimi K2's names another token)."""
        mark = "\ue000reply\ue001"
        try:
            text = self._render(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": mark}], False
            )
        except ChatTemplateError:
            return ()
        _, found, after = text.partition(mark)
        for special in sorted(self.special_texts, key=len, reverse=True):
            if found and after.lstrip().startswith(special):
                ids = self.encode(special, add_special_tokens=False)
                return tuple(ids) if len(ids) == 1 else ()
        return ()


class Tokenizer(ChatTokenizer):
    """The model directory's tokenizer.json and its chat template (from tokenizer_config.json or .jinja)."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"model directory {model_dir} has no tokenizer.json")
        self._tok = _HFTokenizer.from_file(str(path))
        model_cfg = model_dir / "config.json"
        vocab = json.loads(model_cfg.read_text()).get("vocab_size") if model_cfg.is_file() else None
        self.model_vocab_size: int = int(vocab or self._tok.get_vocab_size(with_added_tokens=True))
        """Token ids the model takes (config.json's vocab_size; the tokenizer's when absent)."""
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        specials = {tid: tok for tid, tok in self._tok.get_added_tokens_decoder().items() if tok.special}
        self.special_ids = set(specials)
        self.special_texts = [tok.content for tok in specials.values() if tok.content]
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = model_dir / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        self._template = _compile(template) if template else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _encode_as_text(self, text: str) -> list[int]:
        """`text` tokenized with special-token strings taken as plain text."""
        self._tok.encode_special_tokens = True
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if self._template is None:
            raise ChatTemplateError(
                "this model has no chat template; use /v1/completions with a plain prompt"
            )
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template rejected the messages: {e}") from e


def _compile(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the model's chat template does not compile: {e}") from e


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Decodes a short window (a few tokens of left context plus the new ones) so byte-level BPE
    pieces join correctly, and holds text back while it ends in an incomplete character.
    """

    CONTEXT = 6

    def __init__(self, tokenizer: ChatTokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete character (or nothing visible) so far
        delta = full[len(prefix) :]
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - self.CONTEXT)
        return delta

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character is emitted as U+FFFD)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        self.read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


class StopStrings:
    """Finds stop strings in streamed text; holds back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.matched: str | None = None

    def feed(self, delta: str, final: bool = False) -> str:
        """Add text; returns what can be shown now. After a match, `matched` is set and text ends there."""
        if self.matched is not None:
            return ""
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        cut = None
        for s in self.stops:
            i = self.text.find(s, start)
            if i != -1 and (cut is None or i < cut):
                cut, self.matched = i, s
        if cut is not None:
            out = self.text[self.emitted : cut]
            self.emitted = cut
            return out
        safe = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : safe]
        self.emitted = safe
        return out
