"""Every bad input gets a clear error naming the file or key, never a silently wrong run."""

from __future__ import annotations

import json
import re

import pytest

from megatrain.config import ConfigError, validate
from megatrain.data.errors import DataError
from megatrain.data.shards import VERIFIED
from tests.unit.data_calls import run_build_loader, run_check_data, run_prepare

TEXT = "a small corpus of words, " * 40


def prep_cfg(tmp_path, inputs, **prepare_kw):
    from megatrain.config import Config

    cfg = Config()
    cfg.prepare.input, cfg.prepare.output = inputs, str(tmp_path / "out")
    cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency = 300, 1
    cfg.logging.progress = False
    for key, value in prepare_kw.items():
        setattr(cfg.prepare, key, value)
    return cfg


@pytest.fixture()
def prepared(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT.upper())
    out = run_prepare(prep_cfg(tmp_path, str(tmp_path / "*.txt")))
    cfg = prep_cfg(tmp_path, [])
    cfg.data.path, cfg.model.vocab_size, cfg.train.seq_len = str(out), 512, 16
    return cfg, out


def test_data_error_is_a_config_error():
    assert issubclass(DataError, ConfigError)


@pytest.mark.parametrize("inputs, message", [
    ([], "prepare.input is empty"),
    ("nowhere/*.txt", "'nowhere/\\*.txt' matches no file"),
    ("missing.txt", "'missing.txt' does not exist"),
])
def test_missing_input_is_named(tmp_path, inputs, message):
    with pytest.raises(DataError, match=message):
        run_prepare(prep_cfg(tmp_path, inputs))


def test_empty_inputs_give_no_documents_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match=r"no documents in 2 file\(s\) \(2 empty"):
        run_prepare(prep_cfg(tmp_path, str(tmp_path / "*.txt")))
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="is a directory with no files"):
        run_prepare(prep_cfg(tmp_path, str(tmp_path / "dir")))


def test_non_utf8_file_fails_naming_it_or_is_skipped_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text(TEXT)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not valid UTF-8 \(byte 0xe9 at offset 3\).*on_bad_file=skip"):
        run_prepare(prep_cfg(tmp_path, str(tmp_path / "*.txt")))
    out = run_prepare(prep_cfg(tmp_path, str(tmp_path / "*.txt"), on_bad_file="skip"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"] == 1
    assert len(manifest["source"]["skipped"]) == 1 and "latin1.txt" in manifest["source"]["skipped"][0]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad.jsonl:2: not valid JSON \(Expecting property name"),
    ('{"body": "x"}', r"bad.jsonl:2: no field 'text' \(prepare.text_field\); found: body"),
    ('{"text": 5}', r"bad.jsonl:2: field 'text' is int, expected a string"),
    ('["text"]', r"bad.jsonl:2: no field 'text' \(prepare.text_field\); found: list"),
])
def test_bad_jsonl_records_name_file_and_line(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": TEXT}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        run_prepare(prep_cfg(tmp_path, str(tmp_path / "bad.jsonl"), format="jsonl"))
    out = run_prepare(prep_cfg(tmp_path, str(tmp_path / "bad.jsonl"), format="jsonl", on_bad_file="skip"))
    assert json.loads((out / "manifest.json").read_text())["documents"] == 1


def test_parquet_without_the_text_column_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet: no column 'text' \(prepare.text_field\); columns: content"):
        run_prepare(prep_cfg(tmp_path, str(tmp_path / "t.parquet"), format="parquet"))


@pytest.mark.parametrize("key, value, message", [
    ("format", "xml", "prepare.format='xml' is not allowed"),
    ("text_unit", "page", "prepare.text_unit='page' is not allowed"),
    ("on_bad_file", "ignore", "prepare.on_bad_file='ignore' is not allowed"),
    ("shard_tokens", 0, "prepare.shard_tokens=0 must be positive"),
])
def test_bad_prepare_keys_are_named(tmp_path, key, value, message):
    (tmp_path / "a.txt").write_text(TEXT)
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_prepare(prep_cfg(tmp_path, str(tmp_path / "a.txt"), **{key: value}))


def test_truncated_shard_is_refused_by_check_and_by_the_loader(prepared):
    cfg, out = prepared
    shard = out / "shard_00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"shard_00000.arrow has \d+ bytes, the manifest says \d+: truncated"):
        run_check_data(cfg)
    with pytest.raises(DataError, match="shard_00000.arrow cannot be read as Arrow IPC"):
        run_build_loader(cfg, split="train", seq_len=16, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)


def test_corrupted_shard_fails_the_checksum_even_after_a_passed_check(prepared):
    cfg, out = prepared
    run_check_data(cfg)
    assert (out / VERIFIED).exists()
    shard = out / "shard_00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard_00000.arrow is corrupted: sha256 .* does not match"):
        run_check_data(cfg)


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_verify_fraction_outside_0_1_is_named(prepared, fraction):
    cfg, _ = prepared
    cfg.data.verify_fraction = fraction
    with pytest.raises(DataError, match=f"data.verify_fraction={fraction} must be in \\[0, 1\\]"):
        run_check_data(cfg)


def test_missing_manifest_or_directory_is_named(prepared, tmp_path):
    cfg, out = prepared
    cfg.data.path = str(tmp_path / "nope")
    with pytest.raises(DataError, match="nope does not exist; run `python -m launcher.prepare"):
        run_check_data(cfg)
    (out / "manifest.json").unlink()
    cfg.data.path = str(out)
    with pytest.raises(DataError, match="manifest.json is missing"):
        run_check_data(cfg)


def test_data_from_another_tokenizer_is_refused(prepared, tmp_path):
    cfg, out = prepared
    other_cfg = prep_cfg(tmp_path, str(tmp_path / "a.txt"), output=str(tmp_path / "other"))
    other_cfg.tokenizer.vocab_size = 280
    other = run_prepare(other_cfg)
    cfg.tokenizer.path = str(other / "tokenizer.json")
    with pytest.raises(DataError, match=r"out/manifest.json was written by tokenizer \w+, but tokenizer.path="):
        run_check_data(cfg)
    cfg.tokenizer.path = None
    cfg.data.blend = [f"{out}:1", f"{other}:1"]
    with pytest.raises(DataError, match="every dataset of a run needs the same tokenizer"):
        run_check_data(cfg)
    cfg.data.blend = []
    (out / "tokenizer.json").write_bytes((other / "tokenizer.json").read_bytes())
    with pytest.raises(DataError, match="the shards do not match this tokenizer"):
        run_check_data(cfg)


def test_model_limits_are_checked_against_the_data(prepared):
    cfg, _ = prepared
    cfg.model.vocab_size = 256
    with pytest.raises(DataError, match=r"has (\d+) tokens, more than model.vocab_size=256; set .* >= \1"):
        run_check_data(cfg)
    cfg.model.vocab_size, cfg.train.seq_len = 512, 2048
    with pytest.raises(ConfigError, match="train.seq_len=2048 exceeds model.max_seq_len=1024"):
        validate(cfg, world_size=1)  # lengths are checked in one place, before the data
    cfg.model.max_seq_len = 4096
    with pytest.raises(DataError, match="fewer than one window of train.seq_len \\+ 1 = 2049"):
        run_check_data(cfg)


@pytest.mark.parametrize("blend", [["data/a"], ["data/a:-1"], ["data/a:x"], [":0.5"]])
def test_bad_blend_entries_are_named(prepared, blend):
    cfg, _ = prepared
    cfg.data.blend = blend
    with pytest.raises(DataError, match="data.blend entry .* must be '<prepared dir>:<weight>'"):
        run_check_data(cfg)


def test_loader_refuses_impossible_requests_and_foreign_state(prepared):
    cfg, out = prepared

    def build(**kw):
        args = dict(split="train", seq_len=16, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0) | kw
        return run_build_loader(cfg, **args)

    with pytest.raises(DataError, match="split='test'; choose train or valid"):
        build(split="test")
    with pytest.raises(DataError, match="fewer than micro_batch_size x dp_size = 20000"):
        build(micro_batch_size=10000, dp_size=2)
    with pytest.raises(DataError, match=r"dp_rank=2 is outside \[0, dp_size=2\)"):
        build(dp_rank=2, dp_size=2)
    cfg.data.valid_fraction = 0.0
    with pytest.raises(DataError, match="no validation data: set data.valid_fraction > 0 or data.valid_path"):
        build(split="valid")
    state = build(micro_batch_size=2).state_dict()
    with pytest.raises(DataError, match=r"micro_batch_size': \(2, 4\).*exact resume needs the same"):
        build(micro_batch_size=4).load_state_dict(state)
