"""A shard altered after its check with the mtime restored is caught by the sampled re-hash at the next
start; a token id outside the vocabulary is a named error, not an IndexError in the embedding."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from megatrain.data.manifest import MANIFEST, sha256_file
from tests.e2e.conftest import TRAIN, cli

ARGS = (*TRAIN, "train.precision=fp32", "train.eval_interval=0", "train.steps=1", "train.save_interval=0")


def _overwrite_token_ids(shard: Path, value: int) -> None:
    """Set every token id of the shard's first record batch to `value` in place: same size, same mtime."""
    st = shard.stat()
    mm = pa.memory_map(str(shard), "r")
    whole = mm.read_buffer()
    mm.seek(0)
    values = pa.ipc.open_file(mm).get_batch(0).column(0).values
    start, n = values.buffers()[1].address - whole.address, len(values)
    itemsize = values.type.byte_width
    del values, whole, mm
    with open(shard, "r+b") as f:
        f.seek(start)
        f.write(np.full(n, value, dtype=f"<u{itemsize}").tobytes())
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size


def test_a_shard_edited_with_its_mtime_restored_is_caught_by_the_sampled_rehash(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    first = cli("launcher.train", *ARGS, f"data.path={data}", f"run.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr  # hashed, recorded in .verified.json
    _overwrite_token_ids(data / "shard_00000.arrow", 7)
    result = cli("launcher.train", *ARGS, f"data.path={data}", f"run.dir={tmp_path / 'b'}",
                 "data.verify_fraction=1")
    assert result.returncode == 2, result.stderr
    assert f"shard {data / 'shard_00000.arrow'} is corrupted: sha256" in result.stderr


def test_a_token_id_outside_the_vocabulary_is_a_named_error(tiny_data, tmp_path):
    """A shard whose manifest entry matches it (a buggy or foreign writer) but holds ids the tokenizer lacks."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = data / "shard_00000.arrow"
    _overwrite_token_ids(shard, 60_000)  # the tokenizer has 512 tokens
    manifest = json.loads((data / MANIFEST).read_text())
    manifest["shards"][0]["sha256"] = sha256_file(shard)
    (data / MANIFEST).write_text(json.dumps(manifest))
    result = cli("launcher.train", *ARGS, f"data.path={data}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    assert (f"{data} (train): token id 60000 in the batch ending at global sample 2 is outside the tokenizer's "
            "vocabulary (0..511)") in result.stderr
