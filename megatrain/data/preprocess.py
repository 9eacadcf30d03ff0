"""Raw text -> tokenizer -> Arrow IPC shards of token ids + manifest.json, streamed and deterministic.

The output is built in a temporary sibling directory and renamed into place, with manifest.json written
last: an interrupted run never leaves a directory that looks prepared, and never damages an older one.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer

from megatrain.config import PrepareConfig, TokenizerConfig, check_choice
from megatrain.data import tokenizer as tk
from megatrain.data.errors import DataError
from megatrain.data.manifest import (
    COLUMN,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    is_prepared_dataset,
    sha256_file,
    write_json_atomic,
)
from megatrain.data.sources import (
    DATASETS_FORMATS,
    NATIVE_FORMATS,
    TEXT_UNITS,
    ReadStats,
    iter_documents,
    resolve_inputs,
)

# Documents per tokenizer call: large enough to keep every core busy, small enough to bound memory.
BATCH_CHARS = 4 << 20
BATCH_DOCS = 4096


class ShardWriter:
    """Appends tokenized documents (one row each, EOD appended) to shards of at most `shard_tokens`."""

    def __init__(self, directory: Path, dtype: np.dtype, ids: tk.SpecialIds, shard_tokens: int):
        self.directory, self.dtype, self.ids, self.shard_tokens = directory, dtype, ids, shard_tokens
        self.schema = pa.schema([(COLUMN, pa.list_(pa.from_numpy_dtype(dtype)))])
        self.shards: list[dict] = []
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._docs = self._tokens = 0

    def add(self, token_ids: list[list[int]]) -> None:
        docs = [np.asarray(t, dtype=self.dtype) for t in token_ids]
        extra = 1 + (self.ids.bos is not None)
        cum = np.cumsum([len(d) + extra for d in docs])
        start = 0
        while start < len(docs):
            base = cum[start - 1] if start else 0
            n = int(np.searchsorted(cum[start:] - base, self.shard_tokens - self._tokens, side="right"))
            if n == 0 and self._tokens:  # next document does not fit: close this shard
                self._roll()
                continue
            n = max(n, 1)  # a document longer than a shard gets a shard of its own
            self._write(docs[start:start + n], extra)
            start += n
            if self._tokens >= self.shard_tokens:
                self._roll()

    def _write(self, docs: list[np.ndarray], extra: int) -> None:
        lengths = np.fromiter((len(d) + extra for d in docs), dtype=np.int64, count=len(docs))
        offsets = np.zeros(len(docs) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.empty(int(offsets[-1]), dtype=self.dtype)
        for doc, lo, hi in zip(docs, offsets[:-1], offsets[1:]):
            if self.ids.bos is not None:
                values[lo] = self.ids.bos
            values[lo + extra - 1:hi - 1] = doc
            values[hi - 1] = self.ids.eod
        column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        if self._writer is None:
            name = f"shard_{len(self.shards):05d}.arrow"
            self._writer = pa.ipc.new_file(str(self.directory / name), self.schema)
            self.shards.append({"name": name})
        self._writer.write_batch(pa.record_batch([column], schema=self.schema))
        self._docs += len(docs)
        self._tokens += int(offsets[-1])

    def _roll(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        shard = self.shards[-1]
        path = self.directory / shard["name"]
        shard.update(sha256=sha256_file(path), bytes=path.stat().st_size, documents=self._docs,
                     tokens=self._tokens)
        self._docs = self._tokens = 0

    def close(self) -> list[dict]:
        self._roll()
        return self.shards


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_stream(tok: Tokenizer, docs: Iterable[str]) -> Iterator[list[list[int]]]:
    """Token ids per batch; the Rust tokenizer (all cores, GIL released) encodes batch k while this
    thread reads batch k+1 and the caller writes batch k-1."""
    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for texts in _batches(docs):
            future = pool.submit(encode, texts)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def _check_output(out: Path) -> None:
    """Only a new or empty directory, or one launcher.prepare wrote, may be (re)placed: nothing else is touched."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_prepared_dataset(out))):
        raise DataError(f"prepare.output={out} exists and is not a megatrain prepared dataset (no {MANIFEST} with "
                        f"format={FORMAT!r} and a format_version); choose a new or empty directory: prepare "
                        "never overwrites other files")


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished directory into place; an older prepared dataset there is replaced whole."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def validate_prepare(spec: PrepareConfig) -> None:
    check_choice("prepare.format", spec.format, NATIVE_FORMATS + DATASETS_FORMATS)
    check_choice("prepare.text_unit", spec.text_unit, TEXT_UNITS)
    check_choice("prepare.on_bad_file", spec.on_bad_file, ("fail", "skip"))
    if spec.shard_tokens <= 0:
        raise DataError(f"prepare.shard_tokens={spec.shard_tokens} must be positive")
    if spec.num_proc < 0:
        raise DataError(f"prepare.num_proc={spec.num_proc} must be >= 0 (0: all cores)")


def prepare(spec: PrepareConfig, tokenizer_cfg: TokenizerConfig, progress: bool = True) -> Path:
    """Run the whole preparation; returns the output directory."""
    validate_prepare(spec)
    files = resolve_inputs(spec.input)
    out = Path(spec.output)
    _check_output(out)
    if spec.num_proc:  # read once by the Rust thread pool, when the first parallel call starts it
        os.environ["RAYON_NUM_THREADS"] = str(spec.num_proc)
    total_bytes = sum(f.stat().st_size for f in files)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())
    try:
        with Progress(*columns, disable=not progress, transient=False) as bar:
            tok = _tokenizer(spec, tokenizer_cfg, files, total_bytes, bar)
            ids = tk.special_ids(tok, tokenizer_cfg, tokenizer_cfg.path or "trained here")
            entry = tk.save_tokenizer(tok, tmp, ids, tokenizer_cfg)
            tk.for_encoding(tok)
            dtype = np.dtype(np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32)
            writer = ShardWriter(tmp, dtype, ids, spec.shard_tokens)
            stats = ReadStats()
            task = bar.add_task("tokenizing", total=total_bytes, info="")
            start, tokens = time.perf_counter(), 0
            for batch in _encode_stream(tok, iter_documents(files, spec, stats)):
                writer.add(batch)
                tokens += sum(map(len, batch)) + len(batch) * (1 + (ids.bos is not None))
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                bar.update(task, completed=stats.bytes_read,
                           info=f"{stats.documents:,} docs  {tokens:,} tokens  {rate:,.0f} tok/s")
            shards = writer.close()
        if not stats.documents:
            raise DataError(f"prepare.input: no documents in {len(files)} file(s) ({stats.empty} empty, "
                            f"{len(stats.skipped)} skipped); nothing to prepare")
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "tokenizer": entry, "dtype": dtype.name,
            "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
            "source": {"format": spec.format, "text_unit": spec.text_unit, "text_field": spec.text_field,
                       "files": len(files), "empty_documents": stats.empty, "skipped": stats.skipped},
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - start
    if stats.skipped:
        print(f"skipped {len(stats.skipped)} bad record(s) (prepare.on_bad_file=skip), first: "
              f"{stats.skipped[0]}; all are listed in {out / MANIFEST}", file=sys.stderr)
    print(f"prepared {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in {len(shards)} "
          f"shard(s) ({dtype.name}) at {manifest['tokens'] / max(elapsed, 1e-9):,.0f} tokens/s -> {out}")
    return out


def _tokenizer(spec: PrepareConfig, tokenizer_cfg: TokenizerConfig, files: list, total_bytes: int,
               bar: Progress) -> Tokenizer:
    if tokenizer_cfg.path:
        return tk.load_tokenizer(tokenizer_cfg.path)
    limit = tokenizer_cfg.train_bytes or total_bytes
    stats = ReadStats()
    task = bar.add_task("training tokenizer", total=min(limit, total_bytes), info="")

    def texts() -> Iterator[str]:
        for doc in iter_documents(files, spec, stats):
            yield doc
            bar.update(task, completed=min(stats.bytes_read, limit),
                       info=f"{stats.documents:,} docs  {stats.bytes_read / 1e6:,.1f} MB read")
            if stats.bytes_read >= limit:
                return

    tok = tk.train_tokenizer(texts(), tokenizer_cfg)
    if tok.get_vocab_size() < tokenizer_cfg.vocab_size:
        print(f"warning: tokenizer.vocab_size={tokenizer_cfg.vocab_size:,} was asked, but {stats.bytes_read:,} bytes "
              f"of text give only {tok.get_vocab_size():,} tokens (no pair left that occurs tokenizer.min_frequency="
              f"{tokenizer_cfg.min_frequency} times); train on more text or ask for fewer tokens", file=sys.stderr)
    return tok
