"""What the [b, s, h] layout's sequence-parallel copies cost beside the GEMM they sit next to (one process).

    python bench/bench_sp_copies.py [--batch 4 --seq 512 --hidden 512 --tp 2]

Under SP the row-parallel linears (attention's o, the MLP's down) and the embedding reduce-scatter along
the sequence. reduce_scatter_tensor splits dim 0, so at micro-batch > 1 the [b, s, h] partial sum is copied
to [s, b, h] before it and the [s/t, b, h] shard copied back to [b, s/t, h] after it; backward's all-gather
copies the gradient shard the same way. Times those copies (bf16, median of 30) and the row-parallel GEMM
that produces the partial sum ([b*s, h/t] x [h/t, h]), on the bench_peers width by default.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def median_s(fn, n: int = 30) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    for name, default in (("batch", 4), ("seq", 512), ("hidden", 512), ("tp", 2), ("threads", 1)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    b, s, h, t = a.batch, a.seq, a.hidden, a.tp
    partial = torch.randn(b, s, h).bfloat16()
    shard = torch.randn(s // t, b, h).bfloat16()
    x, w = torch.randn(b * s, h // t).bfloat16(), torch.randn(h, h // t).bfloat16()
    to_seq_major = median_s(lambda: partial.movedim(1, 0).contiguous())
    back = median_s(lambda: shard.movedim(0, 1).contiguous())
    gemm = median_s(lambda: x @ w.t())
    mib = partial.numel() * 2 / 2**20
    print(f"b={b} s={s} h={h} tp={t}, bf16: partial sum to [s, b, h] {to_seq_major * 1e3:.2f} ms ({mib:.1f} MiB), "
          f"shard back to [b, s/t, h] {back * 1e3:.2f} ms ({mib / t:.1f} MiB), row-parallel GEMM {gemm * 1e3:.2f} ms; "
          f"copies / GEMM {(to_seq_major + back) / gemm:.1%}")


if __name__ == "__main__":
    main()
