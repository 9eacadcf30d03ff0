"""RMSNorm (LLaMA) and LayerNorm (GPT-2), computed in fp32 for stability under bf16.

Both keep for backward only the input in its own dtype and per-token statistics in fp32: the fp32
copies they compute in are transient. LayerNorm is torch's kernel (it accepts bf16 input with fp32
parameters and computes in fp32); RMSNorm is `_RMSNorm` below, because torch's `F.rms_norm` on CPU is
a composition of ops that keeps four fp32 copies of the input for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatrain.parallel.layers import make_param, sequence_parallel_param
from megatrain.parallel.mesh import Mesh


class _RMSNorm(torch.autograd.Function):
    """y = x / rms(x) * w in fp32, cast to x's dtype; saves x and 1/rms(x)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (h * rstd * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        g = grad.float()
        grad_w = (g * normed).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype)
        gw = g * weight.float()
        # d/dx of x * rstd: rstd * (gw - normed * mean(gw * normed)) over the normalised dim
        grad_x = (gw - normed * (gw * normed).mean(-1, keepdim=True)).mul_(rstd)
        return grad_x.to(x.dtype), grad_w, None


class Norm(nn.Module):
    def __init__(self, dim: int, kind: str, eps: float, bias: bool, mesh: Mesh, sequence_parallel: bool):
        super().__init__()
        self.kind, self.eps, self.mesh, self.sp = kind, eps, mesh, sequence_parallel
        self.weight = make_param((dim,), ("ones",))
        self.bias = make_param((dim,), ("zeros",)) if bias and kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under sequence parallelism each rank sees a sequence shard: sum the weight grads over TP.
        weight = sequence_parallel_param(self.weight, self.mesh, self.sp)
        if self.kind == "layernorm":
            bias = None if self.bias is None else sequence_parallel_param(self.bias, self.mesh, self.sp)
            return F.layer_norm(x, x.shape[-1:], weight, bias, self.eps)
        return _RMSNorm.apply(x, weight, self.eps)
