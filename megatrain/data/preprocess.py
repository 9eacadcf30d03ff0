"""Raw text -> tokenizer -> Arrow IPC shards of token ids + manifest.json, streamed and deterministic.

The output is built in a temporary sibling directory and renamed into place, with manifest.json written
last: an interrupted run never leaves a directory that looks prepared, and never damages an older one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
# A longer document is tokenized in pieces of at most this many characters (the tokenizer needs ~180
# bytes per character of one input: a 19 MB line took 3.4 GB), cut before a whitespace character that
# precedes a non-whitespace one: byte-level BPE's pre-tokenizer never joins across such a cut, so the
# tokens are the same as the whole document's.
PIECE_CHARS = 1 << 20
_CUT = re.compile(r"\s(?=\S)")


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


def split_document(text: str, limit: int = PIECE_CHARS) -> tuple[list[str], bool]:
    """`text` in pieces of at most `limit` characters, each cut at the last whitespace-before-text in the second
    half of its window; False if some window had none and was cut hard (tokens there may differ)."""
    pieces, start, at_whitespace = [], 0, True
    while len(text) - start > limit:
        cut = None
        for match in _CUT.finditer(text, start + limit // 2, start + limit):
            cut = match.start()
        if cut is None:
            cut, at_whitespace = start + limit, False
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces, at_whitespace


@dataclass
class SplitStats:
    documents: int = 0  # documents longer than PIECE_CHARS, tokenized in pieces
    inexact: int = 0  # ... of which some piece was cut hard, or the tokenizer is not byte-level BPE


def _pieces(docs: Iterable[str], exact_tokenizer: bool, stats: SplitStats) -> Iterator[tuple[str, bool]]:
    """(piece, last piece of its document) for every document."""
    for doc in docs:
        if len(doc) <= PIECE_CHARS:
            yield doc, True
            continue
        pieces, at_whitespace = split_document(doc)
        stats.documents += 1
        stats.inexact += not (at_whitespace and exact_tokenizer)
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


def _batches(pieces: Iterable[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    batch: list[tuple[str, bool]] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[0])
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def splits_exactly(tok: Tokenizer) -> bool:
    """Whether cuts before whitespace leave this tokenizer's output unchanged: byte-level BPE's regex
    pre-tokenizer without a normalizer (what launcher.prepare trains); other tokenizers may differ at a cut."""
    config = json.loads(tok.to_str())
    pre = config.get("pre_tokenizer") or {}
    return config.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _encode_stream(tok: Tokenizer, docs: Iterable[str], stats: SplitStats) -> Iterator[list]:
    """Token ids of the documents completed in each batch; the Rust tokenizer (all cores, GIL released)
    encodes batch k while this thread reads batch k+1 and the caller writes batch k-1."""
    def encode(batch: list[tuple[str, bool]]) -> list[tuple[list[int], bool]]:
        encodings = tok.encode_batch_fast([text for text, _ in batch], add_special_tokens=False)
        return [(e.ids, last) for e, (_, last) in zip(encodings, batch)]

    open_doc: list[np.ndarray] = []  # the pieces of a long document so far, as compact arrays

    def whole(encoded: list[tuple[list[int], bool]]) -> list:
        done = []
        for ids, last in encoded:
            if last and not open_doc:
                done.append(ids)
                continue
            open_doc.append(np.asarray(ids, dtype=np.uint32))
            if last:
                done.append(np.concatenate(open_doc))
                open_doc.clear()
        return done

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in _batches(_pieces(docs, splits_exactly(tok), stats)):
            future = pool.submit(encode, batch)
            if pending is not None:
                yield whole(pending.result())
            pending = future
        if pending is not None:
            yield whole(pending.result())


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
            stats, split = ReadStats(), SplitStats()
            task = bar.add_task("tokenizing", total=total_bytes, info="")
            start, tokens = time.perf_counter(), 0
            for batch in _encode_stream(tok, iter_documents(files, spec, stats), split):
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
    if split.documents:
        exactness = ("the tokens are those of the whole document" if not split.inexact else
                     f"in {split.inexact} of them the tokens at a cut may differ from the whole document's (no "
                     "whitespace near a cut, or a tokenizer other than byte-level BPE)")
        print(f"note: {split.documents} document(s) longer than {PIECE_CHARS:,} characters were tokenized in pieces "
              f"cut at whitespace, to bound memory; {exactness}", file=sys.stderr)
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
