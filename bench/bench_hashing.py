"""What hashing costs per TB: sha256 (data shards, `megatrain.data.manifest.sha256_file`) and xxh3-128
(checkpoint files, `megatrain.engine.checkpoint.file_record`), one core, on a file in the page cache (the
hash's own speed; a cold read is bounded by the disk instead).

    python bench/bench_hashing.py [--mb 256] [--trials 3]

Prints each digest's throughput and, for a dataset of 1 TB, the full hash (launcher.prepare, or the first
check) and the sampled re-hash every start does (data.verify_fraction of the shards, default 0.02), on one
core and on all of this machine's cores (the check hashes shards in parallel threads).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from megatrain.config import DataConfig
from megatrain.data.manifest import sha256_file
from megatrain.engine.checkpoint import file_record

TB = 1e12


def best_rate(fn, path: Path, trials: int) -> float:
    """Bytes per second of the fastest of `trials` runs of fn(path)."""
    size = path.stat().st_size
    fastest = min(_timed(fn, path) for _ in range(trials))
    return size / fastest


def _timed(fn, path: Path) -> float:
    start = time.perf_counter()
    fn(path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="size of the file hashed")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    fraction, cores = DataConfig().verify_fraction, os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.bin"
        path.write_bytes(os.urandom(args.mb << 20))
        _timed(sha256_file, path)  # warm the page cache
        print(f"file {args.mb} MiB in the page cache, best of {args.trials}, load average {os.getloadavg()[0]:.1f}, "
              f"{cores} cores; data.verify_fraction default {fraction}")
        for name, fn in (("sha256 (data shards)", sha256_file), ("xxh3-128 (checkpoints)", file_record)):
            rate = best_rate(fn, path, args.trials)
            full = TB / rate
            print(f"{name:24} {rate / 1e6:8.0f} MB/s per core; per TB: full hash {full / 60:6.1f} min on one core, "
                  f"{full / cores / 60:6.1f} min on {cores}; sampled start check {full * fraction:6.1f} s on one core, "
                  f"{full * fraction / cores:6.1f} s on {cores}")


if __name__ == "__main__":
    main()
