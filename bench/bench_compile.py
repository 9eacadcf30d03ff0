"""Step time with and without `train.compile` on one small workload (one process, DeepSpeed ZeRO-1, bf16).

    python bench/bench_compile.py [--repeats 2] [--steps 12] [--warmup 4] [--layers 4 --d-model 512 --seq 512]

Each run is a fresh process (so every compiled run pays its own compile, in its warm-up steps) on synthetic
token ids; eager and compiled runs alternate. Reports the median step time over the steps after warm-up,
the first step's time (compile included) and the last loss of each run (compiled and eager should agree
within bf16 tolerance). Say the machine and its load beside the figures: these are 2 shared cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(a: argparse.Namespace) -> None:
    import torch

    from megatrain.config import validate
    from megatrain.engine.build import build_engine, init_distributed
    from megatrain.engine.step import train_step
    from megatrain.parallel.mesh import Mesh
    from tests.distributed.workloads import make_config, synthetic_batches

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(a.port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(a.threads)
    model = dict(vocab_size=8192, d_model=a.d_model, n_layers=a.layers, n_heads=a.d_model // 64, n_kv_heads=None,
                 ffn_hidden=None, max_seq_len=a.seq)
    cfg = make_config(model, train=dict(precision="bf16", micro_batch_size=a.batch, global_batch_size=a.batch,
                                        seq_len=a.seq, compile=bool(a.compile)), parallel=dict(zero_stage=1))
    layout = validate(cfg, 1)
    device = torch.device("cpu")
    init_distributed(device)
    engine = build_engine(cfg, Mesh.build(layout), device)
    data = synthetic_batches(a.steps, a.batch, a.seq, 8192)
    times, loss = [], 0.0
    for step in range(a.steps):
        start = time.perf_counter()
        micro = data[step]
        loss = float(train_step(engine, lambda: {"input_ids": micro[:, :-1], "labels": micro[:, 1:]}, 1,
                                device, None)[0])
        times.append(time.perf_counter() - start)
    print("BENCH " + json.dumps({"step_s": statistics.median(times[a.warmup:]), "first_step_s": times[0],
                                 "last_loss": loss}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", type=int, default=-1, help=argparse.SUPPRESS)  # set in worker processes
    ap.add_argument("--port", type=int, default=29611)
    a = ap.parse_args()
    if a.compile >= 0:
        return worker(a)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(a.threads),
               PYTHONWARNINGS="ignore::FutureWarning")
    results: dict[str, list[dict]] = {"eager": [], "compile": []}
    for _ in range(a.repeats):
        for name, flag in (("eager", 0), ("compile", 1)):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--compile", str(flag)], cwd=ROOT, env=env,
                                 capture_output=True, text=True)
            line = [row for row in out.stdout.splitlines() if row.startswith("BENCH ")]
            if not line:
                raise RuntimeError(f"{name} run failed:\n{out.stderr[-3000:]}")
            results[name].append(json.loads(line[0][6:]))
            print(name, results[name][-1], flush=True)
    print("\n| run | step (s, median of runs) | runs | first step (s) | last loss |\n|---|---|---|---|---|")
    for name, runs in results.items():
        steps = [r["step_s"] for r in runs]
        print(f"| {name} | {statistics.median(steps):.3f} | {', '.join(f'{s:.3f}' for s in steps)} | "
              f"{', '.join(f'{r['first_step_s']:.1f}' for r in runs)} | {', '.join(f'{r['last_loss']:.4f}' for r in runs)} |")
    eager, compiled = (statistics.median(r["step_s"] for r in results[k]) for k in ("eager", "compile"))
    print(f"\ncompiled / eager step time: {compiled / eager:.3f} (speed-up {eager / compiled:.2f}x)")


if __name__ == "__main__":
    main()
