"""The packed loader: exact resume, disjoint DP slices covering each epoch, blend proportions, valid split."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatrain.config import Config
from megatrain.data.dataset import permute
from megatrain.data.manifest import read_manifest
from megatrain.data.shards import open_split
from tests.unit.data_calls import run_build_loader, run_check_data, run_prepare

SEQ = 16
ROOT = Path(__file__).resolve().parents[2]


def _prepare(root, name: str, words: list[str], n_docs: int, seed: int, tokenizer: str | None = None):
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 30))) for _ in range(n_docs)]
    src = root / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = Config()
    cfg.prepare.input, cfg.prepare.format, cfg.prepare.output = str(src), "jsonl", str(root / name)
    cfg.prepare.shard_tokens = 2000  # several shards, so windows cross shard boundaries
    cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, cfg.tokenizer.path = 300, 1, tokenizer
    cfg.logging.progress = False
    return run_prepare(cfg)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    a = _prepare(root, "a", "red green blue cyan magenta yellow black white".split(), 300, 0)
    b = _prepare(root, "b", "one two three four five six seven".split(), 200, 1, tokenizer=str(a))
    return a, b


def config(path, **data) -> Config:
    cfg = Config()
    cfg.data.path = str(path)
    cfg.model.vocab_size, cfg.train.seq_len = 512, SEQ
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def loader(cfg, split="train", mbs=2, rank=0, dp=1, seed=7):
    return run_build_loader(cfg, split=split, seq_len=SEQ, micro_batch_size=mbs, dp_rank=rank, dp_size=dp, seed=seed)


def rows(batch) -> list[tuple]:
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
    return [tuple(r) for r in full.tolist()]


def all_windows(path, split="train", fraction=0.01) -> set[tuple]:
    stream = open_split(path, read_manifest(path), split, fraction)
    out = set()
    for w in range(stream.windows(SEQ)):
        buf = np.empty(SEQ + 1, dtype=np.int64)
        stream.read(w * SEQ, buf)
        out.add(tuple(buf.tolist()))
    return out


@pytest.mark.parametrize("blend", [False, True])
def test_resume_from_state_replays_the_identical_batches(data, blend):
    a, b = data
    cfg = config(a, document_mask=True, blend=[f"{a}:0.6", f"{b}:0.4"] if blend else [])
    original = loader(cfg, mbs=3)
    steps = original.epoch_len[0] // 3 + 5  # 3 windows a call: runs past the first dataset's epoch end
    for _ in range(7):
        original.next_batch()
    state = original.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    expected = [original.next_batch() for _ in range(steps)]
    resumed = loader(cfg, mbs=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as stored in a checkpoint
    for want in expected:
        got = resumed.next_batch()
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_dp_ranks_get_disjoint_windows_that_cover_each_epoch(data):
    a, _ = data
    cfg, dp, mbs = config(a), 3, 2
    loaders = [loader(cfg, mbs=mbs, rank=r, dp=dp) for r in range(dp)]
    epoch_len = loaders[0].epoch_len[0]
    universe = all_windows(a)
    assert len(universe) == loaders[0].windows[0]  # random text: every window is distinct
    epochs = []
    for _ in range(2):
        seen = []
        for _ in range(epoch_len // (dp * mbs)):
            step = [rows(ld.next_batch()) for ld in loaders]
            flat = [r for rank_rows in step for r in rank_rows]
            assert len(set(flat)) == len(flat)  # disjoint within a step
            seen += flat
        assert len(set(seen)) == len(seen) == epoch_len  # every kept window exactly once
        assert set(seen) <= universe
        assert len(universe) - epoch_len < dp * mbs  # only the remainder is dropped
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def test_blend_follows_the_weights_within_one_sample_at_every_step(data):
    a, b = data
    cfg = config(a, blend=[f"{a}:3", f"{b}:1"])
    in_a, in_b = all_windows(a), all_windows(b)
    ld = loader(cfg, mbs=4)
    from_a = total = 0
    for _ in range(40):
        for row in rows(ld.next_batch()):
            assert (row in in_a) != (row in in_b)
            from_a += row in in_a
            total += 1
        assert abs(from_a - 0.75 * total) < 1
    assert ld.state_dict()["consumed_0"] == from_a


def test_same_seed_same_order_other_seed_other_order(data):
    a, _ = data
    first = [rows(loader(config(a), seed=s).next_batch()) for s in (1, 1, 2)]
    assert first[0] == first[1] != first[2]


def test_valid_split_is_held_out_fixed_and_restarts_from_the_same_windows(data):
    a, _ = data
    cfg = config(a, valid_fraction=0.05)
    valid_a = [rows(loader(cfg, split="valid").next_batch()) for _ in range(2)]
    assert valid_a[0] == valid_a[1]
    once = loader(cfg, split="valid")  # the trainer builds it once and rewinds it at every eval
    first = [rows(once.next_batch()) for _ in range(2)]
    once.rewind()
    assert [rows(once.next_batch()) for _ in range(2)] == first and first[0] == valid_a[0]
    train, valid = all_windows(a, "train", 0.05), all_windows(a, "valid", 0.05)
    assert not train & valid and set(valid_a[0]) <= valid
    info = run_check_data(cfg)
    assert info.train_tokens + info.valid_tokens == read_manifest(a)["tokens"]
    assert info.valid_tokens >= 0.05 * read_manifest(a)["tokens"]


def test_valid_path_serves_a_separate_prepared_set_without_carving(data):
    a, b = data
    cfg = config(a, valid_path=str(b))
    assert set(rows(loader(cfg, split="valid").next_batch())) <= all_windows(b, "all")
    assert run_check_data(cfg).train_tokens == read_manifest(a)["tokens"]


def test_labels_are_inputs_shifted_and_doc_ids_restart_after_each_eod(data):
    a, _ = data
    eod = read_manifest(a)["tokenizer"]["eod_id"]
    batch = loader(config(a, document_mask=True), mbs=8).next_batch()
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    for ids, doc in zip(batch["input_ids"].tolist(), batch["doc_ids"].tolist()):
        expected, current = [], 0
        for token in ids:
            expected.append(current)
            current += token == eod
        assert doc == expected
    assert (batch["doc_ids"][:, -1] > 0).any()  # the fixture packs several documents per window


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000, 4097])
def test_permutation_is_a_seeded_bijection(n):
    idx = np.arange(n)
    p = permute(idx, n, key=11)
    assert sorted(p.tolist()) == list(range(n))
    if n > 64:
        assert not np.array_equal(p, idx) and not np.array_equal(p, permute(idx, n, key=12))


def test_check_data_reports_the_tokenizer_and_token_counts(data):
    a, _ = data
    info = run_check_data(config(a))
    manifest = read_manifest(a)
    assert (info.vocab_size, info.eod_id) == (manifest["tokenizer"]["vocab_size"], 0)
    assert info.tokenizer_path.endswith("tokenizer.json") and info.train_tokens > 0


def test_shards_are_read_as_zero_copy_views_without_importing_pandas(data):
    """pyarrow's Array.to_numpy imports pandas (0.45 s of every rank's start); the views must equal its output."""
    a, _ = data
    code = f"""
import sys
import numpy as np
import pyarrow as pa
from megatrain.data.manifest import read_manifest
from megatrain.data.shards import open_split
root = {str(a)!r}
manifest = read_manifest(root)
stream = open_split(root, manifest, "all", 0.0)
assert "pandas" not in sys.modules, "reading shards imported pandas"
assert not any(s.flags.owndata for s in stream.segments), "a segment was copied"
arrow = [pa.ipc.open_file(pa.memory_map(root + "/" + s["name"])).read_all().column(0).combine_chunks().values
         for s in manifest["shards"]]
assert np.array_equal(np.concatenate(stream.segments), np.concatenate([x.to_numpy() for x in arrow]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
