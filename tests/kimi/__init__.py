"""A tiny Kimi-K2-shaped model for tests: a DeepSeek-V3 architecture routed as Kimi K2 routes (one
expert group), no tokenizer.json, and a tokenizer that is code shipped with the model
(`tokenization_tinykimi.py`, tiktoken ranks in `tiktoken.model`), which runs only with
`trust_remote_code`. As in Kimi K2's release, config.json's eos_token_id names `[EOS]` while a reply
ends at the chat template's `<|im_end|>` (which generation_config.json names)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

from services.tools.tiny import make_tiny_model
from tests.kimi.tokenization_tinykimi import SPECIALS  # the tokenizer's own list (it ships alone)

HERE = Path(__file__).resolve().parent
RANKS = [bytes([b]) for b in range(256)] + [b"th", b"he", b"in", b"e ", b" t", b"the", b"er", b"an"]
IDS = {t: len(RANKS) + i for i, t in enumerate(SPECIALS)}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_{{ m['role'] }}|>{{ m['role'] }}<|im_middle|>{{ m['content'] }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
)


def make_tiny_kimi(out_dir: Path, seed: int = 0) -> Path:
    out = make_tiny_model(out_dir, "deepseek_v3", seed=seed, overrides={"n_group": 1, "topk_group": 1})
    for name in ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)
    (out / "tiktoken.model").write_text(
        "".join(f"{base64.b64encode(piece).decode()} {rank}\n" for rank, piece in enumerate(RANKS))
    )
    shutil.copy(HERE / "tokenization_tinykimi.py", out)
    tokenizer_config = {
        "tokenizer_class": "TinyKimiTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_tinykimi.TinyKimiTokenizer", None]},
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    config = json.loads((out / "config.json").read_text())
    config.update(bos_token_id=IDS["[BOS]"], eos_token_id=IDS["[EOS]"], pad_token_id=IDS["[EOS]"])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": IDS["[BOS]"], "eos_token_id": IDS["<|im_end|>"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out
