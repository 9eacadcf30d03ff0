"""launcher.prepare's library side: formats, round trip, determinism, shard bounds, safe output dirs."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatrain.config import Config
from megatrain.data.dataset import load_tokenizer
from megatrain.data.errors import DataError
from tests.unit.data_calls import run_prepare

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda café 日本 🦊".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) + rng.choice([".", "!\n", "?"])
            for _ in range(n)]


def config(tmp_path, inputs, **prepare) -> Config:
    cfg = Config()
    cfg.prepare.input = inputs
    cfg.prepare.output = str(tmp_path / "out")
    cfg.tokenizer.vocab_size = 300
    cfg.tokenizer.min_frequency = 1
    cfg.logging.progress = False
    for key, value in prepare.items():
        setattr(cfg.prepare, key, value)
    return cfg


def read_docs(out) -> list[list[int]]:
    manifest = json.loads((out / "manifest.json").read_text())
    docs = []
    for shard in manifest["shards"]:
        with pa.memory_map(str(out / shard["name"])) as f:
            docs += pa.ipc.open_file(f).read_all().column("input_ids").to_pylist()
    return docs


def decoded(out) -> list[str]:
    tok = load_tokenizer(str(out))
    eod = json.loads((out / "manifest.json").read_text())["tokenizer"]["eod_id"]
    docs = read_docs(out)
    assert all(d[-1] == eod and eod not in d[:-1] for d in docs)  # exactly one EOD, at the end
    return [tok.decode(d[:-1], skip_special_tokens=False) for d in docs]


def test_text_files_round_trip_one_document_per_file(tmp_path):
    docs = make_docs(5) + ["contains <|endoftext|> literally"]
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(doc)
    out = run_prepare(config(tmp_path, str(tmp_path / "*.txt")))
    assert decoded(out) == docs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["documents"] == len(docs)
    assert manifest["tokens"] == sum(map(len, read_docs(out)))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_record_formats_round_trip_with_a_configurable_field(tmp_path, fmt):
    docs = make_docs(30)
    path = tmp_path / f"in.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    elif fmt == "parquet":
        pq.write_table(pa.table({"id": list(range(30)), "body": docs}), path, row_group_size=7)
    else:
        import csv
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([["body"]] + [[d] for d in docs])
    out = run_prepare(config(tmp_path, [str(path)], format=fmt, text_field="body"))
    assert decoded(out) == docs


def test_text_units_split_files_into_paragraphs_or_lines(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n\n\nfour\n")
    assert decoded(run_prepare(config(tmp_path, str(tmp_path / "a.txt"), text_unit="paragraph"))) == \
        ["one\ntwo", "three", "four"]
    assert decoded(run_prepare(config(tmp_path, str(tmp_path / "a.txt"), text_unit="line"))) == \
        ["one", "two", "three", "four"]


def test_prepare_is_byte_identical_when_rerun(tmp_path):
    (tmp_path / "in").mkdir()
    for i, doc in enumerate(make_docs(40)):
        (tmp_path / "in" / f"{i:02d}.txt").write_text(doc)
    first = run_prepare(config(tmp_path, str(tmp_path / "in"), output=str(tmp_path / "a"), shard_tokens=300))
    second = run_prepare(config(tmp_path, str(tmp_path / "in"), output=str(tmp_path / "b"), shard_tokens=300))
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and len(names) > 3
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_shards_respect_the_token_bound_and_cover_every_document(tmp_path):
    docs = make_docs(60)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = run_prepare(config(tmp_path, str(tmp_path / "in.jsonl"), format="jsonl", shard_tokens=200))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) > 3
    assert all(s["tokens"] <= 200 for s in manifest["shards"])
    assert decoded(out) == docs


def test_vocab_beyond_uint16_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokens = sorted(alphabet) + ["<|endoftext|>"] + [f"x{i}" for i in range(70000)]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "a.txt").write_text("hello")
    cfg = config(tmp_path, str(tmp_path / "a.txt"))
    cfg.tokenizer.path = str(tmp_path / "big.json")
    out = run_prepare(cfg)
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "uint32"
    assert decoded(out) == ["hello"]


def test_bos_token_is_prepended_when_configured(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    cfg = config(tmp_path, str(tmp_path / "a.txt"))
    cfg.tokenizer.bos_token = "<s>"
    out = run_prepare(cfg)
    [doc] = read_docs(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert doc[0] == manifest["tokenizer"]["bos_id"] and doc[-1] == manifest["tokenizer"]["eod_id"]


def test_rerun_replaces_a_prepared_dir_but_never_a_foreign_one(tmp_path):
    (tmp_path / "a.txt").write_text("first version")
    cfg = config(tmp_path, str(tmp_path / "a.txt"))
    out = run_prepare(cfg)
    (tmp_path / "a.txt").write_text("second version")
    assert decoded(run_prepare(cfg)) == ["second version"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    cfg.prepare.output = str(foreign)
    with pytest.raises(DataError, match="exists and is not a megatrain prepared dataset"):
        run_prepare(cfg)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    assert out.exists()


def test_failed_prepare_keeps_the_previous_output_intact(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "good"}\n')
    cfg = config(tmp_path, str(tmp_path / "a.jsonl"), format="jsonl")
    out = run_prepare(cfg)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "a.jsonl").write_text('{"text": "good"}\n{"text": 3}\n')
    with pytest.raises(DataError):
        run_prepare(cfg)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]


def test_tokens_in_shards_equal_a_direct_encoding(tmp_path):
    docs = make_docs(10)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = run_prepare(config(tmp_path, str(tmp_path / "in.jsonl"), format="jsonl"))
    tok = load_tokenizer(str(out))
    assert [np.asarray(d[:-1]).tolist() for d in read_docs(out)] == [tok.encode(d).ids for d in docs]


def test_long_documents_split_at_whitespace_tokenize_as_the_whole(tmp_path):
    from megatrain.data.preprocess import split_document, splits_exactly

    rng = random.Random(1)
    text = "".join(rng.choice(WORDS) + rng.choice([" ", "  ", "\n", " \n\t", ". ", "\n\n"]) for _ in range(3000))
    (tmp_path / "a.txt").write_text(text)
    tok = load_tokenizer(str(run_prepare(config(tmp_path, str(tmp_path / "a.txt"))) / "tokenizer.json"))
    pieces, at_whitespace = split_document(text, limit=200)
    assert at_whitespace and len(pieces) > 50 and "".join(pieces) == text and max(map(len, pieces)) <= 200
    assert splits_exactly(tok)
    assert [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids] == tok.encode(
        text, add_special_tokens=False).ids
    hard, at_whitespace = split_document("x" * 450, limit=200)  # no whitespace: cut hard, and said so
    assert [len(p) for p in hard] == [200, 200, 50] and not at_whitespace
