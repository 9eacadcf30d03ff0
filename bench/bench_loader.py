"""Loader per-batch cost: the blend schedule at growing DP sizes, and what the step waits for with prefetch.

    python bench/bench_loader.py [--tokens 1100000] [--batches 40] [--step-ms 20]

Three prepared datasets of random words (blended 0.5 / 0.3 / 0.2 and 0.7 / 0.3). Part 1: milliseconds
per `next_batch()` on rank 0 (every rank computes the blend of the whole global batch, so its cost grows
with DP). Part 2: a stand-in step of about --step-ms after each batch, either a sleep (the host idle while a
GPU computes) or bf16 matmuls (a CPU step, the host busy); the time the loop waits for its batch,
built in the step (data.prefetch=0) or ahead in a thread (data.prefetch=2).
Runs against any checkout (PYTHONPATH): part 2 needs megatrain.data.prefetch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from megatrain.config import Config
from megatrain.data.dataset import build_loader
from megatrain.data.preprocess import prepare

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def make_set(root: Path, name: str, tokens: int, seed: int, tokenizer: str | None) -> Path:
    rng = random.Random(seed)
    src = root / f"{name}.jsonl"
    with src.open("w") as f:
        for _ in range(tokens // 200 + 1):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) + rng.choice("abcdefgh")
                                                 for _ in range(200))}) + "\n")
    cfg = Config()
    cfg.prepare.input, cfg.prepare.format, cfg.prepare.output = str(src), "jsonl", str(root / name)
    cfg.tokenizer.vocab_size, cfg.tokenizer.path = 1024, tokenizer
    return prepare(cfg.prepare, cfg.tokenizer, progress=False)


def per_batch_ms(cfg: Config, batches: int, **kw) -> float:
    ld = build_loader(cfg.data, split="train", seed=0, **kw)
    ld.next_batch()  # opens the shards
    start = time.perf_counter()
    for _ in range(batches):
        ld.next_batch()
    return (time.perf_counter() - start) / batches * 1e3


def stand_in_step(kind: str, step_ms: float):
    """A function taking about step_ms: a sleep (host idle) or bf16 matmuls (host busy)."""
    if kind == "sleep":
        return lambda: time.sleep(step_ms / 1e3)
    a = torch.randn(512, 512, dtype=torch.bfloat16)
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    reps = max(1, round(step_ms / ((time.perf_counter() - t) / 10 * 1e3)))
    return lambda: [a @ a for _ in range(reps)]


def step_wait_ms(cfg: Config, batches: int, step, depth: int, **kw) -> tuple[float, float]:
    """(ms the loop waits for a batch, ms per step in all) with `step` after each batch."""
    from megatrain.data.prefetch import run_ahead

    ld = run_ahead(build_loader(cfg.data, split="train", seed=0, **kw), depth, torch.device("cpu"))
    ld.next_batch()
    waited, start = 0.0, time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        ld.next_batch()
        waited += time.perf_counter() - t
        step()
    total = time.perf_counter() - start
    ld.close()
    return waited / batches * 1e3, total / batches * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_100_000, help="per dataset")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--step-ms", type=float, default=20.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        first = make_set(root, "a", args.tokens, 0, None)
        sets = [first] + [make_set(root, n, args.tokens, s, str(first)) for n, s in (("b", 1), ("c", 2))]
        print("| loader, seq 256 x mbs 8, rank 0 | blend | ms per batch |\n|---|---|---|")
        cfg = Config()
        for blend in ((0.7, 0.3), (0.5, 0.3, 0.2)):
            cfg.data.blend = [f"{p}:{w}" for p, w in zip(sets, blend)]
            for dp in (1, 64, 512):
                ms = per_batch_ms(cfg, args.batches, seq_len=256, micro_batch_size=8, dp_rank=0, dp_size=dp)
                print(f"| DP {dp} ({8 * dp} samples blended per batch) | {' / '.join(map(str, blend))} | {ms:.3f} |")
        cfg.data.blend = [f"{p}:{w}" for p, w in zip(sets, (0.5, 0.3, 0.2))]
        print(f"\n| stand-in step of ~{args.step_ms:.0f} ms, DP 64 | loader | waits for its batch (ms) "
              "| ms per step |\n|---|---|---|---|")
        for kind in ("sleep", "matmul"):
            for depth in (0, 2):
                try:
                    wait, total = step_wait_ms(cfg, args.batches, stand_in_step(kind, args.step_ms), depth,
                                               seq_len=256, micro_batch_size=8, dp_rank=0, dp_size=64)
                except ImportError:
                    print(f"| {kind} | data.prefetch={depth}: no megatrain.data.prefetch in this checkout | | |")
                    continue
                print(f"| {kind} | data.prefetch={depth} | {wait:.3f} | {total:.2f} |")
        print(f"\nload average (1 min): {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
