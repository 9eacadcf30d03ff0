"""The prepared-dataset format, shared by its writer (preprocess.py) and its readers (shards.py).

A prepared directory holds Arrow IPC shards of token ids (one list column, one row per document) and
`manifest.json`: format version, tokenizer entry, dtype, per-shard name / bytes / sha256 / documents /
tokens, and what the input was.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from megatrain.data.errors import DataError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
COLUMN = "input_ids"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: dict) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(part, path)


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
