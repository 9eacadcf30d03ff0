"""Rotary position embeddings (RoPE), in the half-split layout Hugging Face Llama uses."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
@torch.no_grad()
def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin tables [seq_len, head_dim] in fp32, computed once per shape and device (pipeline
    stages build a block context per block and micro-batch)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x * cos + rotate_half(x) * sign * sin, written half by half into one new tensor of x's dtype and
    layout: no rotated copy, no fp32 copy. The tables come in x's dtype: a bf16 x with fp32 tables takes
    PyTorch's mixed-dtype kernels, 6x slower on CPU (8.3 against 1.3 ms for q of the bench_peers workload)."""
    half = x.shape[-1] // 2
    if torch.compiler.is_compiling():
        # torch.compile traces no `out=` of a non-contiguous layout (q and k are transposed views): a graph
        # break in every block. The plain formula instead: inductor fuses it into one pass writing x's dtype.
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x * cos + rotated * (sign * sin)).to(x.dtype)
    out = torch.mul(x, cos, out=torch.empty_like(x))
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin[..., :half], value=sign)
    return out


class _Rope(torch.autograd.Function):
    """A rotation: its backward is the inverse rotation, so nothing but the shared tables is saved."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, seq, head_dim] by the fp32 tables, rounded to x's dtype first (as Hugging Face
    Llama does: cos.to(x.dtype)), so fp32 runs are unchanged."""
    return _Rope.apply(x, cos.to(x.dtype), sin.to(x.dtype))
