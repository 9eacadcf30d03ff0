"""The fused LM head + loss (`Head`), eager vs torch.compile, one process: graph breaks, exactness, time.

    TORCH_LOGS=graph_breaks python bench/bench_compile_head.py [--vocab 8192 --d-model 256 --tokens 512]

Forward and backward (loss and the gradients of the hidden states and of the head's parameters) on random
hidden states, fp32; prints the compile's first call, the largest difference from eager and the median of
5 timed calls of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatrain.config import ModelConfig
from megatrain.model.init import init_parameter
from megatrain.model.transformer import Head
from megatrain.parallel.mesh import Mesh


def main() -> None:
    ap = argparse.ArgumentParser()
    for name, default in (("vocab", 8192), ("d-model", 256), ("tokens", 512), ("chunk", 256), ("threads", 1)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = ModelConfig(vocab_size=a.vocab, d_model=a.d_model, n_layers=1, n_heads=a.d_model // 64,
                      max_seq_len=a.tokens, loss_chunk_tokens=a.chunk)
    head = Head(cfg, Mesh.single())
    for name, p in head.named_parameters():
        init_parameter(p, f"head.{name}", seed=1, mesh=Mesh.single())
    h = torch.randn(1, a.tokens, a.d_model, requires_grad=True)
    labels = torch.randint(0, a.vocab, (1, a.tokens))
    compiled = torch.compile(head)

    def call(fn) -> tuple[float, list[torch.Tensor]]:
        start = time.perf_counter()
        loss = fn(h, labels)
        grads = torch.autograd.grad(loss, [h, *head.parameters()])
        return time.perf_counter() - start, [loss.detach(), *grads]

    _, eager = call(head)
    first, got = call(compiled)
    diff = max((x - y).abs().max().item() for x, y in zip(got, eager))
    times = {"eager": [], "compiled": []}
    for _ in range(5):
        for kind, fn in (("eager", head), ("compiled", compiled)):
            times[kind].append(call(fn)[0])
    print(f"first compiled call {first:.1f} s; largest difference from eager {diff:.1e}; median s/call: "
          + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
