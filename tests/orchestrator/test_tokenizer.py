import pytest
from transformers import AutoTokenizer

from orchestrator.tokenizer import ChatTemplateError, IncrementalDetokenizer, StopStrings, Tokenizer

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is a mixture of experts? café 東京 😀"},
]


@pytest.fixture(scope="module")
def tok(ds_dir):
    return Tokenizer(ds_dir)


def test_chat_template_tokenizes_like_transformers(tok, ds_dir):
    hf = AutoTokenizer.from_pretrained(ds_dir)
    ref = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    assert tok.apply_chat_template(MESSAGES) == ref
    assert tok.encode("plain text, ünïcode") == hf.encode("plain text, ünïcode")


def test_template_errors_are_clear(tok):
    with pytest.raises(ChatTemplateError, match="role must be system, user or assistant"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_incremental_detokenization_never_splits_utf8(tok):
    text = "naïve café 東京 😀 ok"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # multi-byte characters come out whole


def test_detokenizer_matches_full_decode_for_arbitrary_ids(tok):
    ids = [300, 12, 200, 255, 7, 466, 101, 160, 125, 138, 3, 400]
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert streamed == tok.decode(ids)


@pytest.mark.parametrize("chunks", [["hello wor", "ld. STOP here"], ["hel", "lo world. S", "TO", "P", " x"]])
def test_stop_strings_cut_and_hold_back(chunks):
    s = StopStrings(["STOP", "never"])
    shown = "".join(s.feed(c) for c in chunks)
    assert shown == "hello world. "
    assert s.matched == "STOP"


def test_no_stop_emits_everything_at_the_end():
    s = StopStrings(["zzz"])
    assert s.feed("abc") == "a"  # "bc" might start "zzz"? no, but the last 2 chars are held
    assert s.feed("de", final=True) == "bcde"
