"""Peak activation memory of a forward + backward with document masking: each attention kernel.

    python bench/bench_attention_memory.py [--seq 4096] [--batch 1] [--d-model 256] [--heads 8]
        [--kv-heads 2] [--layers 2] [--mean-doc 512] [--kernels dense,dense-math,segments]

Method: the tiny-width model (megatrain's Transformer, fp32, on the CPU) runs one forward and backward
with `doc_ids` of seeded random documents (mean length --mean-doc) under bench_loss_memory's LiveBytes,
a TorchDispatchMode that counts the bytes of every storage the ops create (mask, saved activations,
gradients) while it is alive; the figure is the peak. Kernels:
- `dense`: model.attention_backend=math, the path before this change (a dense [b, 1, s, s] boolean mask);
  SDPA's CPU kernel takes the mask without materialising scores, so only the mask is O(s^2) here;
- `dense-math`: the same with SDPA restricted to its math kernel -- what a GPU runs with a dense mask and
  GQA (or flash-only dtypes): it keeps the [b, h, s, s] scores of every layer for the backward;
- `segments`: model.attention_backend=auto on the CPU, one causal SDPA call per document: no [s, s] tensor.
Also printed: the bytes of the FlexAttention block mask the CUDA path builds (its kernel cannot run here).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss_memory import LiveBytes  # noqa: E402  (a sibling script, not a package)

from megatrain.config import ModelConfig  # noqa: E402
from megatrain.model.attention import document_block_mask  # noqa: E402
from megatrain.model.transformer import Transformer  # noqa: E402


def random_doc_ids(batch: int, seq: int, mean_doc: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.cumsum((torch.rand(batch, seq, generator=gen) < 1 / mean_doc).int(), dim=1).int()


def measure(kernel: str, args) -> int:
    cfg = ModelConfig(vocab_size=512, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, max_seq_len=args.seq, loss_chunk_tokens=1024,
                      attention_backend="auto" if kernel == "segments" else "math")
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    doc_ids = random_doc_ids(args.batch, args.seq, args.mean_doc)
    math_only = sdpa_kernel([SDPBackend.MATH]) if kernel == "dense-math" else contextlib.nullcontext()
    with LiveBytes([ids, doc_ids, *model.parameters()]) as mode, math_only:
        model(ids[:, :-1], ids[:, 1:], doc_ids=doc_ids).backward()
        model.zero_grad(set_to_none=True)  # the gradients stay alive with the parameters: drop them after the peak
    return mode.peak


def block_mask_bytes(batch: int, seq: int, mean_doc: int) -> int:
    """The block mask's tile tables (its mask_mod reads doc_ids, which the batch already holds)."""
    mask = document_block_mask(random_doc_ids(batch, seq, mean_doc))
    return sum(t.untyped_storage().nbytes() for t in mask.as_tuple(flatten=True) if isinstance(t, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--mean-doc", type=int, default=512)
    parser.add_argument("--kernels", default="dense,dense-math,segments")
    args = parser.parse_args()
    docs = int(random_doc_ids(args.batch, args.seq, args.mean_doc)[:, -1].sum()) + args.batch
    print(f"{args.batch} x {args.seq} tokens, {docs} documents, d_model {args.d_model}, {args.heads}/{args.kv_heads} "
          f"heads, {args.layers} layers, fp32, CPU; dense mask = {args.batch * args.seq ** 2 / 2**20:,.1f} MiB")
    print("| kernel | peak activation memory, forward + backward (MiB) |\n|---|---|")
    for kernel in args.kernels.split(","):
        print(f"| {kernel} | {measure(kernel, args) / 2**20:,.1f} |")
    for seq in (args.seq, 8 * args.seq):
        print(f"FlexAttention block mask (CUDA path), {args.batch} x {seq}: "
              f"{block_mask_bytes(args.batch, seq, args.mean_doc) / 2**10:,.1f} KiB")


if __name__ == "__main__":
    main()
