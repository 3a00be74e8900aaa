"""What GetTokenizer ships to a router: a tokenizer that is code goes with its code and vocabulary."""

from __future__ import annotations

from services.models import ModelConfig
from services.worker.front.info_rpcs import tokenizer_files
from tests.kimi import IDS, make_tiny_kimi


def test_a_kimi_tokenizer_ships_with_its_code_and_ranks(tmp_path, ds_dir):
    kimi = make_tiny_kimi(tmp_path / "kimi")
    files = tokenizer_files(kimi)
    assert {"tokenizer_config.json", "tiktoken.model", "tokenization_tinykimi.py"} <= set(files)
    assert "generation_config.json" in files and "tokenizer.json" not in files
    assert "tokenization_tinykimi.py" not in tokenizer_files(ds_dir)


def test_generation_config_adds_its_end_of_reply_token(tmp_path):
    """config.json names [EOS]; generation_config.json names <|im_end|>: the engine stops at both."""
    cfg = ModelConfig.from_dir(make_tiny_kimi(tmp_path / "kimi"))
    assert cfg.eos_token_ids == (IDS["[EOS]"], IDS["<|im_end|>"])
