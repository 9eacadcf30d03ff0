"""The prepared-dataset format, shared by its writer (preprocess.py) and its readers (shards.py).

A prepared directory holds Arrow IPC shards of token ids (one list column, one row per document) and
`manifest.json`: format marker and version, tokenizer entry, dtype, per-shard name / bytes / sha256 / documents /
tokens, and what the input was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from megatrain.config import DataConfig, padded_vocab_size
from megatrain.data.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "megatrain-prepared-dataset"  # the marker that lets prepare replace a directory (nothing else)
FORMAT_VERSION = 1
COLUMN = "input_ids"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a part."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def _umask() -> int:
    try:  # read without setting it: os.umask() changes it for every thread for a moment
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def with_umask_mode(path: str | Path) -> None:
    """Give a file the mode `open()` would (0666 minus the umask): tempfile.mkstemp and safetensors create
    0600, which colleagues on a shared filesystem cannot read."""
    os.chmod(path, 0o666 & ~_umask())


def write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def is_prepared_dataset(directory: Path) -> bool:
    """Whether `directory` is provably one launcher.prepare wrote: its manifest carries our marker and a version.

    A `manifest.json` alone proves nothing (web apps and other tools write one too).
    """
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and isinstance(manifest.get("format_version"), int))


def read_manifest(directory: str | Path) -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"data directory {d} does not exist; run `python -m launcher.prepare "
                        f"prepare.output={d} ...` first")
    path = d / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} is missing: {d} is not a prepared dataset, or its preparation did "
                        "not finish")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run launcher.prepare") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version={manifest.get('format_version')!r}, this megatrain reads "
                        f"{FORMAT_VERSION}; re-run launcher.prepare")
    return manifest


def parse_blend(data: DataConfig) -> list[tuple[str, float]]:
    """(directory, weight) pairs from data.blend ("dir:weight"), or data.path alone; weights sum to 1."""
    if not data.blend:
        return [(data.path, 1.0)]
    pairs = []
    for entry in data.blend:
        path, _, weight = str(entry).rpartition(":")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not path or not (w > 0 and math.isfinite(w)):
            raise DataError(f"data.blend entry {entry!r} must be '<prepared dir>:<weight>' with a weight "
                            "> 0, e.g. data.blend=[data/web:0.7,data/code:0.3]")
        pairs.append((path, w))
    total = sum(w for _, w in pairs)
    return [(p, w / total) for p, w in pairs]


@dataclass(frozen=True)
class VocabChoice:
    """The model vocabulary sized from the data's tokenizer (model.vocab_size=null)."""

    vocab_size: int  # the model's: the tokenizer's, padded
    tokenizer_vocab: int
    source: str  # the prepared dataset whose tokenizer sized it

    @property
    def padding(self) -> int:
        return self.vocab_size - self.tokenizer_vocab


def vocab_from_data(data: DataConfig, multiple: int, tp: int) -> VocabChoice:
    """The tokenizer size of the run's (first) dataset, padded up to a multiple of `multiple` x `tp`
    (Megatron's rule: every TP shard of the embedding holds whole, aligned blocks of rows)."""
    directory = parse_blend(data)[0][0]
    tokenizer_vocab = int(read_manifest(directory)["tokenizer"]["vocab_size"])
    return VocabChoice(padded_vocab_size(tokenizer_vocab, multiple, tp), tokenizer_vocab, directory)
