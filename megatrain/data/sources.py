"""Raw inputs -> a stream of document strings, with errors that name the file, the line and the fix."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatrain.config import PrepareConfig
from megatrain.data.errors import DataError

NATIVE_FORMATS = ("text", "jsonl", "parquet")
DATASETS_FORMATS = ("json", "csv", "arrow")  # read through HF `datasets` builders
TEXT_UNITS = ("file", "paragraph", "line")
SKIP_HINT = "or set prepare.on_bad_file=skip to skip and count bad records"


@dataclass
class ReadStats:
    """What the readers saw: input bytes consumed (for progress) and everything skipped."""

    bytes_read: int = 0
    documents: int = 0
    empty: int = 0
    skipped: list[str] = field(default_factory=list)  # "<file>[:<line>]: <why>"


def resolve_inputs(spec: Any) -> list[Path]:
    """Files named by `prepare.input`: a path, a directory (all files under it), a glob, or a list."""
    items = [spec] if isinstance(spec, str) else list(spec or [])
    if not items:
        raise DataError("prepare.input is empty; give files, directories or globs, e.g. "
                        "prepare.input=data/raw/'*.txt' or prepare.input=[a.txt,b.txt]")
    files: dict[Path, None] = {}  # ordered set: a file named twice is read once
    for item in map(str, items):
        path = Path(item).expanduser()
        if any(c in item for c in "*?["):
            found = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
            if not found:
                raise DataError(f"prepare.input entry {item!r} matches no file")
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise DataError(f"prepare.input entry {item!r} is a directory with no files")
        elif path.is_file():
            found = [path]
        else:
            raise DataError(f"prepare.input entry {item!r} does not exist")
        files.update(dict.fromkeys(found))
    return list(files)


def iter_documents(files: list[Path], cfg: PrepareConfig, stats: ReadStats) -> Iterator[str]:
    """Every non-empty document of every file, in a fixed order (files as resolved, records as stored)."""
    readers = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}
    reader = readers.get(cfg.format, _read_datasets)
    for path in files:
        for doc in reader(path, cfg, stats):
            if doc.strip():
                stats.documents += 1
                yield doc
            else:
                stats.empty += 1


def _bad(cfg: PrepareConfig, stats: ReadStats, where: str, why: str) -> None:
    if cfg.on_bad_file == "fail":
        raise DataError(f"{where}: {why}; fix or remove it, {SKIP_HINT}")
    stats.skipped.append(f"{where}: {why}")


def _decode(raw: bytes, cfg: PrepareConfig, stats: ReadStats, where: str) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _bad(cfg, stats, where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")
        return None


def _open(path: Path, cfg: PrepareConfig, stats: ReadStats):
    try:
        return path.open("rb")
    except OSError as e:
        _bad(cfg, stats, str(path), f"cannot be read ({e.strerror})")
        return None


def _read_text(path: Path, cfg: PrepareConfig, stats: ReadStats) -> Iterator[str]:
    f = _open(path, cfg, stats)
    if f is None:
        return
    with f:
        if cfg.text_unit == "file":
            raw = f.read()
            stats.bytes_read += len(raw)
            text = _decode(raw, cfg, stats, str(path))
            if text is not None:
                yield text
            return
        paragraph: list[str] = []
        for lineno, raw in enumerate(f, 1):  # streamed: a text file larger than RAM is fine here
            stats.bytes_read += len(raw)
            line = _decode(raw, cfg, stats, f"{path}:{lineno}")
            if line is None:
                continue
            if cfg.text_unit == "line":
                yield line.rstrip("\r\n")
            elif line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).rstrip("\r\n")
                paragraph = []
        if paragraph:
            yield "".join(paragraph).rstrip("\r\n")


def _field(record: Any, cfg: PrepareConfig, stats: ReadStats, where: str) -> str | None:
    if not isinstance(record, dict) or cfg.text_field not in record:
        present = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        _bad(cfg, stats, where, f"no field {cfg.text_field!r} (prepare.text_field); found: {present}")
        return None
    value = record[cfg.text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        _bad(cfg, stats, where, f"field {cfg.text_field!r} is {type(value).__name__}, expected a string")
        return None
    return value


def _read_jsonl(path: Path, cfg: PrepareConfig, stats: ReadStats) -> Iterator[str]:
    f = _open(path, cfg, stats)
    if f is None:
        return
    with f:
        for lineno, raw in enumerate(f, 1):
            stats.bytes_read += len(raw)
            where = f"{path}:{lineno}"
            line = _decode(raw, cfg, stats, where)
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                _bad(cfg, stats, where, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            text = _field(record, cfg, stats, where)
            if text is not None:
                yield text


def _read_parquet(path: Path, cfg: PrepareConfig, stats: ReadStats) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        _bad(cfg, stats, str(path), f"not a readable parquet file ({e})")
        return
    if cfg.text_field not in pf.schema_arrow.names:
        _bad(cfg, stats, str(path), f"no column {cfg.text_field!r} (prepare.text_field); "
                                    f"columns: {', '.join(pf.schema_arrow.names)}")
        return
    kind = pf.schema_arrow.field(cfg.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        _bad(cfg, stats, str(path), f"column {cfg.text_field!r} has type {kind}, expected a string")
        return
    # Row-group batches: a parquet file larger than RAM streams through.
    for batch in pf.iter_batches(batch_size=1024, columns=[cfg.text_field]):
        stats.bytes_read += batch.nbytes
        yield from (t or "" for t in batch.column(0).to_pylist())


def _read_datasets(path: Path, cfg: PrepareConfig, stats: ReadStats) -> Iterator[str]:
    import datasets

    try:
        rows = datasets.load_dataset(cfg.format, data_files=[str(path)], split="train", streaming=True)
        for i, row in enumerate(rows):
            text = _field(row, cfg, stats, f"{path}: row {i}")
            if text is not None:
                yield text
    except DataError:
        raise
    except Exception as e:  # datasets wraps parser errors in many types; name the file either way
        _bad(cfg, stats, str(path), f"cannot be read as {cfg.format} by HF datasets "
                                    f"({type(e).__name__}: {e})")
    stats.bytes_read += path.stat().st_size
