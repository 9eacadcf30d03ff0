"""RMSNorm (LLaMA) and LayerNorm (GPT-2), computed in fp32 for stability under bf16."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatrain.parallel.layers import make_param, sequence_parallel_param
from megatrain.parallel.mesh import Mesh


class Norm(nn.Module):
    def __init__(self, dim: int, kind: str, eps: float, bias: bool, mesh: Mesh, sequence_parallel: bool):
        super().__init__()
        self.kind, self.eps, self.mesh, self.sp = kind, eps, mesh, sequence_parallel
        self.weight = make_param((dim,), ("ones",))
        self.bias = make_param((dim,), ("zeros",)) if bias and kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under sequence parallelism each rank sees a sequence shard: sum the weight grads over TP.
        weight = sequence_parallel_param(self.weight, self.mesh, self.sp).float()
        bias = None if self.bias is None else sequence_parallel_param(self.bias, self.mesh, self.sp).float()
        h = x.float()
        if self.kind == "layernorm":
            h = F.layer_norm(h, h.shape[-1:], weight, bias, self.eps)
        else:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * weight
        return h.to(x.dtype)
