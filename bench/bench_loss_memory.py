"""Peak memory of the LM head + loss (forward and backward): fused and chunked vs logits made whole.

    python bench/bench_loss_memory.py [--vocab 128256] [--seq 4096] [--batch 1] [--d-model 2048]
        [--dtype bf16] [--device meta] [--chunks 1024,4096] [--paths unfused,fused]

Method: a TorchDispatchMode sees every tensor the ops create (autograd's saved tensors and the
gradients included), adds each new storage's bytes to a live count and subtracts them when the storage
is freed (a weakref finalizer); the figure is the peak of that count above what existed before (the
hidden states h and the head weight W are inputs, not counted). On `--device meta` no memory is
allocated and no arithmetic done, but the ops, their tensors and their lifetimes are the same as on a
real device, so full-size shapes can be accounted on a small machine; `--device cpu` runs it for real.
Allocator caching and fragmentation are not in the figure. `unfused` is the head as one matmul then
megatrain's vocab_parallel_cross_entropy; run it with PYTHONPATH set to an older checkout to measure
that checkout's loss.
"""

from __future__ import annotations

import argparse
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while the mode is active and still alive."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.live = self.peak = 0
        # Views of the inputs (w.t() in a matmul) share their storage: not new memory.
        self.seen: set[int] = {t.untyped_storage()._cdata for t in existing}

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.seen:  # views and in-place results share a storage
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def head_loss(path: str, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int | None) -> None:
    from megatrain.parallel.cross_entropy import vocab_parallel_cross_entropy

    if path == "unfused":
        loss = vocab_parallel_cross_entropy(F.linear(h, w), targets, 0, None).mean()
    else:
        from megatrain.parallel.cross_entropy import chunked_head_cross_entropy
        loss = chunked_head_cross_entropy(h, w, targets, 0, None, chunk)
    loss.backward()


def measure(path: str, args, chunk: int | None) -> int:
    dtype, n = DTYPES[args.dtype], args.batch * args.seq
    h = torch.randn(n, args.d_model, dtype=dtype, device=args.device, requires_grad=True)
    w = torch.randn(args.vocab, args.d_model, dtype=dtype, device=args.device, requires_grad=True)
    targets = torch.randint(0, args.vocab, (n,), device=args.device)
    with LiveBytes([h, w, targets]) as mode:
        head_loss(path, h, w, targets, chunk)
        del h, w  # the gradients stay alive with them: drop them after the peak was taken
    return mode.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--device", default="meta")
    parser.add_argument("--chunks", default="1024,4096")
    parser.add_argument("--paths", default="unfused,fused")
    args = parser.parse_args()
    n = args.batch * args.seq
    logits = n * args.vocab * 4
    print(f"vocab {args.vocab}, {args.batch} x {args.seq} tokens, d_model {args.d_model}, {args.dtype}, "
          f"device {args.device}; one fp32 logits tensor = {logits / 2**30:.2f} GiB; "
          f"grad of W = {args.vocab * args.d_model * torch.finfo(DTYPES[args.dtype]).bits / 8 / 2**30:.2f} GiB")
    print("| path | chunk (tokens) | peak head+loss memory (MiB) |\n|---|---|---|")
    for path in args.paths.split(","):
        for chunk in ([None] if path == "unfused" else [int(c) for c in args.chunks.split(",")]):
            peak = measure(path, args, chunk)
            print(f"| {path} | {chunk or 'all'} | {peak / 2**20:,.0f} |")


if __name__ == "__main__":
    main()
