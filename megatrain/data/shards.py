"""Reading prepared datasets: manifest, checksums, memory-mapped token streams of the train/valid split."""

from __future__ import annotations

import json
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from megatrain.data.errors import DataError
from megatrain.data.manifest import MANIFEST, sha256_file, write_json_atomic
from megatrain.data.tokenizer import load_tokenizer, tokenizer_hash

VERIFIED = ".verified.json"  # sha256 results keyed by (size, mtime): a multi-TB set is hashed once


def check_tokenizer_file(directory: Path, manifest: dict) -> None:
    """The tokenizer beside the shards must be the one that wrote them."""
    actual = tokenizer_hash(load_tokenizer(str(directory / manifest["tokenizer"]["file"])))
    if actual != manifest["tokenizer"]["sha256"]:
        written = manifest["tokenizer"]["sha256"][:12]
        raise DataError(f"{directory / manifest['tokenizer']['file']} has sha256 {actual[:12]}, but "
                        f"{directory / MANIFEST} was written with tokenizer {written}; "
                        "the shards do not match this tokenizer: re-run launcher.prepare")


def verify_checksums(directory: Path, manifest: dict, hash_shards: bool = True, verify_fraction: float = 1.0) -> None:
    """Sizes, then the full sha256 of every shard against the manifest (when `hash_shards`). Shards
    unchanged since a passed check (same size and mtime) are hashed again only in a random sample of
    `verify_fraction` of them (at least one if > 0): size + mtime prove nothing against a deliberate edit."""
    cache_path = directory / VERIFIED
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    todo, cached = [], []
    for shard in manifest["shards"]:
        path = directory / shard["name"]
        if not path.is_file():
            raise DataError(f"shard {path} listed in {directory / MANIFEST} is missing")
        st = path.stat()
        if st.st_size != shard["bytes"]:
            raise DataError(f"shard {path} has {st.st_size} bytes, the manifest says {shard['bytes']}: "
                            "truncated or replaced; re-run launcher.prepare")
        stamp = [st.st_size, st.st_mtime_ns, shard["sha256"]]
        if hash_shards:
            (todo if cache.get(shard["name"]) != stamp else cached).append((shard, path, stamp))
    if cached and verify_fraction > 0:
        todo += random.Random().sample(cached, min(len(cached), math.ceil(verify_fraction * len(cached))))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # hashlib releases the GIL
        digests = list(pool.map(lambda item: sha256_file(item[1]), todo))
    for (shard, path, stamp), digest in zip(todo, digests):
        if digest != shard["sha256"]:
            raise DataError(f"shard {path} is corrupted: sha256 {digest[:12]} does not match the manifest's "
                            f"{shard['sha256'][:12]}; re-run launcher.prepare")
        cache[shard["name"]] = stamp
    if todo:
        try:
            write_json_atomic(cache_path, cache)
        except OSError:
            pass  # a read-only dataset is re-hashed next time, never trusted unhashed


@dataclass
class Stream:
    """A split of one dataset as memory-mapped token segments read back to back; windows are slices."""

    segments: list[np.ndarray]
    starts: np.ndarray  # int64 [len(segments) + 1]: cumulative token offsets

    @property
    def tokens(self) -> int:
        return int(self.starts[-1])

    def windows(self, seq_len: int) -> int:
        """Windows of seq_len + 1 tokens with stride seq_len: every token is predicted exactly once."""
        return max(self.tokens - 1, 0) // seq_len

    def read(self, pos: int, out: np.ndarray) -> None:
        """Fill `out` with the tokens at [pos, pos + len(out)), across segment boundaries."""
        i = int(np.searchsorted(self.starts, pos, side="right")) - 1
        done = 0
        while done < len(out):
            seg = self.segments[i]
            lo = pos + done - int(self.starts[i])
            n = min(len(out) - done, len(seg) - lo)
            out[done:done + n] = seg[lo:lo + n]
            done += n
            i += 1


def _view(array: pa.Array) -> np.ndarray:
    """A zero-copy numpy view of a primitive Arrow array without nulls (Array.to_numpy imports pandas: 0.45 s
    of every rank's start)."""
    if array.null_count:
        raise pa.ArrowInvalid(f"{array.null_count} nulls in a token column")
    dtype = np.dtype(str(array.type))
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _segments(path: Path, shard: dict, dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(values, offsets) per record batch, zero-copy views into the memory-mapped file."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        out = []
        for b in range(reader.num_record_batches):
            column = reader.get_batch(b).column(0)
            out.append((_view(column.values), _view(column.offsets)))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"shard {path} cannot be read as Arrow IPC ({e}); re-run launcher.prepare") from e
    docs, tokens = sum(len(o) - 1 for _, o in out), sum(len(v) for v, _ in out)
    if (docs, tokens) != (shard["documents"], shard["tokens"]) or any(v.dtype != dtype for v, _ in out):
        raise DataError(f"shard {path} holds {docs} documents / {tokens} tokens, the manifest says "
                        f"{shard['documents']} / {shard['tokens']} ({dtype}); re-run launcher.prepare")
    return out


def _valid_cut(offsets: list[np.ndarray], tokens: int, fraction: float) -> int:
    """First token of the shard's held-out tail: whole trailing documents, at least `fraction` of it."""
    if fraction <= 0:
        return tokens
    bases = np.cumsum([0] + [int(o[-1]) for o in offsets[:-1]])
    starts = np.concatenate([o[:-1].astype(np.int64) + base for o, base in zip(offsets, bases)])
    target = tokens - math.ceil(fraction * tokens)
    return int(starts[np.searchsorted(starts, target, side="right") - 1])


def open_split(directory: str | Path, manifest: dict, split: str, valid_fraction: float) -> Stream:
    """The "train", "valid" (tails carved per shard) or "all" tokens of a prepared dataset."""
    d = Path(directory)
    pieces: list[np.ndarray] = []
    for shard in manifest["shards"]:
        segs = _segments(d / shard["name"], shard, manifest["dtype"])
        cut = _valid_cut([o for _, o in segs], shard["tokens"], valid_fraction if split != "all" else 0.0)
        lo, hi = (cut, shard["tokens"]) if split == "valid" else (0, cut)
        base = 0
        for values, _ in segs:
            a, b = max(lo - base, 0), min(hi - base, len(values))
            if a < b:
                pieces.append(values[a:b])
            base += len(values)
    starts = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=starts[1:])
    return Stream(pieces, starts)
