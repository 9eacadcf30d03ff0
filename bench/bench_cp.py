"""Context parallelism on the CPU: per-rank peak memory and tokens/s of one long sequence, CP1 vs CP2.

    python bench/bench_cp.py [--seq 8192] [--steps 3] [--modes ring,ulysses]

A tiny-width model (fp32, d_model 64, 2 blocks, 4 heads / 2 KV heads, vocab 256; the benchmark is about
the sequence) trains on one sample of `--seq` tokens: forward + backward (no optimizer), one warm-up
step, then `--steps` timed ones. CP1 is one process (SDPA); CP2 is two processes on gloo, each holding
its two zigzag chunks. Per rank it prints: the bytes autograd saved in one forward (activations), the
peak RSS growth over the RSS before the first step (activations + transient attention buffers +
gradients), and tokens/s of the sample (both CP ranks work on the same tokens). On a shared CPU the
two CP ranks also share its cores, so tokens/s here measures overhead, not the speed-up of CP on GPUs.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import time

import torch
import torch.multiprocessing as mp

from megatrain.config import Layout, ModelConfig
from megatrain.parallel.mesh import Mesh


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(rank: int, seq: int, steps: int, mode: str, cp: int, port: int, out: dict) -> None:
    from megatrain.engine.build import init_distributed, return_freed_memory_on_cpu
    from megatrain.model.init import init_parameter
    from megatrain.model.transformer import Transformer

    torch.set_num_threads(1)
    return_freed_memory_on_cpu()
    mesh = Mesh.single()
    if cp > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(cp), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        init_distributed(torch.device("cpu"))
        mesh = Mesh.build(Layout(cp=cp, cp_mode=mode))
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                      max_seq_len=seq, loss_chunk_tokens=1024)
    model = Transformer(cfg, mesh)
    for name, p in model.named_parameters():
        init_parameter(p, name, seed=0, mesh=mesh)
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    saved: dict[int, int] = {}
    params = {p.untyped_storage()._cdata for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage()._cdata not in params:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    before = _rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()  # the warm-up step
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(ids[:, :-1], ids[:, 1:]).backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out[rank] = dict(saved_mb=sum(saved.values()) / 2**20, peak_growth_mb=(peak - before) / 2**20,
                     tokens_per_s=seq / (sum(times) / len(times)), loss=float(loss))


def run(seq: int, steps: int, mode: str, cp: int) -> list[dict]:
    with mp.Manager() as manager:
        out = manager.dict()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_measure, args=(seq, steps, mode, cp, port, out), nprocs=cp, start_method="spawn")
        return [out[rank] for rank in range(cp)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", default="ring,ulysses")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"seq {args.seq}, fp32, d_model 64, 2 blocks, 4 heads / 2 KV heads; forward + backward, "
          f"mean of {args.steps} steps after a warm-up")
    print(f"{'layout':<14} {'rank':>4} {'saved MB':>9} {'peak RSS growth MB':>19} {'tokens/s':>9} {'loss':>8}")
    for label, mode, cp in [("cp1", "ring", 1)] + [(f"cp2 {m}", m, 2) for m in args.modes.split(",")]:
        for rank, r in enumerate(run(args.seq, args.steps, mode, cp)):
            print(f"{label:<14} {rank:>4} {r['saved_mb']:9.1f} {r['peak_growth_mb']:19.1f} "
                  f"{r['tokens_per_s']:9.0f} {r['loss']:8.4f}")


if __name__ == "__main__":
    main()
