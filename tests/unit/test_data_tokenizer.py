"""Tokenizer: byte-level BPE training, loading from every supported form, hashing, special tokens."""

from __future__ import annotations

import pytest

from megatrain.config import TokenizerConfig
from megatrain.data.errors import DataError
from megatrain.data.tokenizer import (
    for_encoding,
    load_tokenizer,
    special_ids,
    tokenizer_hash,
    train_tokenizer,
)

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 20, "Ünïcödé: naïve café, 日本語, emoji 🦊\n" * 10,
         "def f(x):\n    return x * 2  # code\n" * 15]


def _trained(**kw) -> tuple:
    cfg = TokenizerConfig(vocab_size=400, min_frequency=1, **kw)
    return train_tokenizer(iter(TEXTS), cfg), cfg


def test_training_is_deterministic_and_puts_eod_first():
    a, cfg = _trained(bos_token="<s>", pad_token="<pad>")
    b, _ = _trained(bos_token="<s>", pad_token="<pad>")
    assert tokenizer_hash(a) == tokenizer_hash(b)
    ids = special_ids(a, cfg, "test")
    assert (ids.eod, ids.bos, ids.pad) == (0, 1, 2)


def test_byte_level_bpe_round_trips_any_utf8_text():
    tok, _ = _trained()
    for text in TEXTS + ["unseen: ∮ E⋅da = Q, \t\r\n ÿ \x00 ok"]:
        assert tok.decode(tok.encode(text).ids) == text


def test_special_token_strings_inside_text_are_encoded_as_text():
    tok, cfg = _trained()
    eod = special_ids(tok, cfg, "test").eod
    ids = for_encoding(tok).encode("before <|endoftext|> after").ids
    assert eod not in ids
    assert tok.decode(ids) == "before <|endoftext|> after"


def test_tokenizer_json_directory_and_vocab_merges_load_to_the_same_hash(tmp_path):
    tok, cfg = _trained()
    special_ids(tok, cfg, "test")
    tok.save(str(tmp_path / "tokenizer.json"))
    gpt2_dir = tmp_path / "gpt2"
    gpt2_dir.mkdir()
    tok.model.save(str(gpt2_dir))  # vocab.json + merges.txt, the GPT-2 layout
    from_file = load_tokenizer(str(tmp_path / "tokenizer.json"))
    from_dir = load_tokenizer(str(tmp_path))
    from_vm = load_tokenizer(str(gpt2_dir))
    special_ids(from_vm, cfg, str(gpt2_dir))
    assert tokenizer_hash(from_file) == tokenizer_hash(from_dir) == tokenizer_hash(tok)
    assert from_vm.encode(TEXTS[1]).ids == tok.encode(TEXTS[1]).ids


def test_vocab_too_small_for_bytes_is_refused():
    with pytest.raises(DataError, match="tokenizer.vocab_size=100 is too small"):
        train_tokenizer(iter(TEXTS), TokenizerConfig(vocab_size=100))


def test_loaded_tokenizer_without_the_eod_token_is_refused(tmp_path):
    tok, _ = _trained()
    with pytest.raises(DataError, match=r"no token tokenizer.eod_token='</doc>'"):
        special_ids(tok, TokenizerConfig(eod_token="</doc>"), "x.json")


def test_missing_or_malformed_tokenizer_path_names_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.json does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json cannot be loaded"):
        load_tokenizer(str(bad))
    with pytest.raises(DataError, match="holds neither tokenizer.json nor vocab.json"):
        load_tokenizer(str(tmp_path))
