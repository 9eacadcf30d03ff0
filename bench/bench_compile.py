"""Step time with and without `train.compile`, paired step by step in one process (DeepSpeed ZeRO-1, bf16).

    python bench/bench_compile.py [--steps 20] [--warmup 3] [--layers 4 --d-model 512 --seq 256 --batch 4]

One engine is built with `train.compile=true`; after the warm-up steps (which pay the compile) steps
alternate between the compiled blocks and the same blocks run eagerly (`torch.compiler.set_stance
("force_eager")`), so both see the same weights, data shapes and, on a shared machine, nearly the same load.
Reports the median step time of each and the median of the per-pair ratios, on synthetic token ids.
Say the machine and its load beside the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="timed steps (half eager, half compiled)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    from megatrain.config import validate
    from megatrain.engine.build import build_engine, init_distributed
    from megatrain.engine.step import train_step
    from megatrain.parallel.mesh import Mesh
    from tests.distributed.workloads import make_config, synthetic_batches

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29611", DS_ACCELERATOR="cpu").items():
        os.environ.setdefault(key, value)
    torch.set_num_threads(a.threads)
    model = dict(vocab_size=8192, d_model=a.d_model, n_layers=a.layers, n_heads=a.d_model // 64, max_seq_len=a.seq)
    cfg = make_config(model, train=dict(precision="bf16", micro_batch_size=a.batch, global_batch_size=a.batch,
                                        seq_len=a.seq, compile=True), parallel=dict(zero_stage=1))
    layout = validate(cfg, 1)
    device = torch.device("cpu")
    init_distributed(device)
    engine = build_engine(cfg, Mesh.build(layout), device)
    data = synthetic_batches(a.warmup + a.steps, a.batch, a.seq, 8192)

    def step(i: int) -> float:
        micro = data[i]
        start = time.perf_counter()
        train_step(engine, lambda: {"input_ids": micro[:, :-1], "labels": micro[:, 1:]}, 1, device, None)
        return time.perf_counter() - start

    first = [step(i) for i in range(a.warmup)]
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for i in range(a.warmup, a.warmup + a.steps):
        kind = "eager" if i % 2 else "compiled"
        with torch.compiler.set_stance("force_eager" if kind == "eager" else "default"):
            times[kind].append(step(i))
    ratios = [c / e for e, c in zip(times["eager"], times["compiled"])]
    print(f"warm-up steps (compile included): {', '.join(f'{t:.2f}' for t in first)} s")
    for kind, values in times.items():
        print(f"{kind}: median {statistics.median(values):.3f} s/step ({', '.join(f'{t:.2f}' for t in values)})")
    print(f"compiled / eager, median of {len(ratios)} pairs: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
