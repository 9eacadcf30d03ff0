"""Byte-level BPE tokenizers: train one with HF `tokenizers`, or load tokenizer.json / GPT-2 vocab+merges."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatrain.config import TokenizerConfig
from megatrain.data.errors import DataError

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class SpecialIds:
    eod: int
    bos: int | None
    pad: int | None


def special_tokens(cfg: TokenizerConfig) -> list[str]:
    """EOD first (id 0 in a trained vocab), then BOS and PAD, without duplicates."""
    tokens = [cfg.eod_token, cfg.bos_token, cfg.pad_token]
    return list(dict.fromkeys(t for t in tokens if t))


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a byte-level BPE on a stream of documents (only word counts are held in memory)."""
    if cfg.vocab_size < 256 + len(special_tokens(cfg)):
        raise DataError(f"tokenizer.vocab_size={cfg.vocab_size} is too small: a byte-level BPE needs the 256 "
                        f"byte symbols plus {len(special_tokens(cfg))} special tokens")
    tok = Tokenizer(models.BPE())
    # No normalizer: byte-level BPE is then lossless, decode(encode(text)) == text for any UTF-8 text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=special_tokens(cfg), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def _from_vocab_merges(vocab: Path, merges: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from a prepared data dir, a tokenizer.json, or a GPT-2 style vocab.json + merges.txt."""
    p = Path(path)
    if p.is_dir():
        if (p / TOKENIZER_FILE).is_file():
            p = p / TOKENIZER_FILE
        elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return _from_vocab_merges(p / "vocab.json", p / "merges.txt")
        else:
            raise DataError(f"tokenizer path {path}: directory holds neither {TOKENIZER_FILE} nor "
                            "vocab.json + merges.txt")
    elif p.name.endswith("vocab.json") and (p.parent / "merges.txt").is_file():
        return _from_vocab_merges(p, p.parent / "merges.txt")
    if not p.is_file():
        raise DataError(f"tokenizer path {path} does not exist; give a tokenizer.json, a directory holding "
                        "one, or a directory with vocab.json + merges.txt")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"tokenizer file {path} cannot be loaded: {e}") from e


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of the canonical serialisation: the same model hashes the same whatever file it came from."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def special_ids(tok: Tokenizer, cfg: TokenizerConfig, where: str) -> SpecialIds:
    """Ids of the configured special tokens; an existing tokenizer must already contain them."""
    ids = {}
    for key in ("eod_token", "bos_token", "pad_token"):
        token = getattr(cfg, key)
        if token is None:
            ids[key] = None
            continue
        ids[key] = tok.token_to_id(token)
        if ids[key] is None:
            raise DataError(f"tokenizer {where} has no token tokenizer.{key}={token!r}; set tokenizer.{key} "
                            "to a token of its vocabulary")
    # Registering them as special keeps them whole in decode and lets encode treat them as text (below).
    tok.add_special_tokens(special_tokens(cfg))
    return SpecialIds(eod=ids["eod_token"], bos=ids["bos_token"], pad=ids["pad_token"])


def for_encoding(tok: Tokenizer) -> Tokenizer:
    """Encode special-token strings found in raw text as plain text: EOD ids then only mark real ends."""
    tok.encode_special_tokens = True
    return tok


def save_tokenizer(tok: Tokenizer, directory: Path, ids: SpecialIds, cfg: TokenizerConfig) -> dict:
    """Write tokenizer.json into `directory`; return its manifest entry."""
    tok.save(str(directory / TOKENIZER_FILE))
    return {"file": TOKENIZER_FILE, "sha256": tokenizer_hash(tok), "vocab_size": tok.get_vocab_size(),
            "eod_token": cfg.eod_token, "eod_id": ids.eod, "bos_token": cfg.bos_token, "bos_id": ids.bos,
            "pad_token": cfg.pad_token, "pad_id": ids.pad}

