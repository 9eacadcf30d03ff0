"""Megatron-style tensor-parallel layers.

Column-parallel linears split the output features across TP ranks, row-parallel linears the
input features; a column followed by a row needs one all-reduce forward and one backward.
With sequence parallelism the activations between those pairs are split along the sequence
(dim 1 of [batch, seq, hidden]) and the all-reduces become all-gather / reduce-scatter
(the collectives are in `mappings.py`).

Every sharded parameter carries `tp_dim` (the dim split across TP ranks; None: replicated) and
`init` (how to initialise the *full* tensor), so initialisation, export and consolidation are
the same for every layout. DeepSpeed reads `model_parallel` / `tensor_model_parallel` to
count each element once in the gradient norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatrain.parallel.mappings import copy_to_tp, gather_sequence, reduce_from_tp, reduce_scatter_sequence
from megatrain.parallel.mesh import Mesh


def enter_tp_region(x: torch.Tensor, mesh: Mesh, sp: bool) -> torch.Tensor:
    """The input of column-parallel ops: gathered along the sequence (SP) or marked replicated (its
    gradient is summed over TP ranks). Done once when several linears share it (q, k, v)."""
    return gather_sequence(x, mesh.tp_group) if sp else copy_to_tp(x, mesh.tp_group)


def sequence_parallel_param(p: torch.Tensor, mesh: Mesh, sp: bool) -> torch.Tensor:
    """A replicated parameter used on a sequence shard: its gradient is summed across TP ranks."""
    return copy_to_tp(p, mesh.tp_group) if sp else p


def make_param(shape: tuple[int, ...], init: tuple, tp_dim: int | None = None,
               ep_dim: int | None = None) -> nn.Parameter:
    """An uninitialised parameter with the metadata that layout-independent init needs.

    `ep_dim`: the dim split across expert-parallel ranks (routed experts' stacked weights), like `tp_dim`."""
    p = nn.Parameter(torch.empty(shape))
    p.init = init
    p.tp_dim = tp_dim
    p.ep_dim = ep_dim
    if tp_dim is not None:
        p.model_parallel = p.tensor_model_parallel = True
        p.partition_dim = tp_dim
    return p


def _local(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what}={n} is not divisible by tensor-parallel size {tp}")
    return n // tp


def vocab_shard(vocab_size: int, mesh: Mesh) -> tuple[int, int]:
    """(first token id, count) of this TP rank's slice of the vocabulary: embedding, head and loss agree."""
    local = _local(vocab_size, mesh.tp, "vocab size")
    return mesh.tp_rank * local, local


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by rows (output features) across TP ranks; output stays split."""

    def __init__(self, in_features: int, out_features: int, mesh: Mesh, *, bias: bool = False,
                 std: float = 0.02, sequence_parallel: bool = False):
        super().__init__()
        self.mesh, self.sp = mesh, sequence_parallel
        local = _local(out_features, mesh.tp, "output features")
        self.weight = make_param((local, in_features), ("normal", std), tp_dim=0)
        self.bias = make_param((local,), ("zeros",), tp_dim=0) if bias else None

    def forward(self, x: torch.Tensor, ready: bool = False) -> torch.Tensor:
        """`ready`: x already entered the TP region (gathered / marked), e.g. shared by q, k, v."""
        if not ready:
            x = enter_tp_region(x, self.mesh, self.sp)
        return F.linear(x, self.weight, self.bias)


class _FusedLinear(torch.autograd.Function):
    """x [W1; W2; ...]^T + [b1; b2; ...] as one GEMM. Saves x and the separate weights, not their
    concatenation: the fused weight is remade in backward, never kept as an activation."""

    @staticmethod
    def forward(ctx, x, n_weights, *params):
        weights, biases = params[:n_weights], params[n_weights:]
        ctx.n_weights, ctx.has_bias = n_weights, bool(biases)
        ctx.save_for_backward(x, *weights)
        return F.linear(x, torch.cat(weights), torch.cat(biases) if biases else None)

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        sizes = [w.shape[0] for w in weights]
        grad_x = grad @ torch.cat(weights)
        flat = grad.reshape(-1, grad.shape[-1])
        grad_w = (flat.t() @ x.reshape(-1, x.shape[-1])).split(sizes)
        grad_b = flat.sum(0).split(sizes) if ctx.has_bias else ()
        return grad_x, None, *grad_w, *grad_b


def fused_column_linear(x: torch.Tensor, linears: list[ColumnParallelLinear]) -> tuple[torch.Tensor, ...]:
    """The outputs of column-parallel linears that share their input x (already in the TP region:
    `enter_tp_region`), computed as one GEMM. Each keeps its own parameter, so checkpoints, init
    and export see the separate q/k/v (gate/up) weights; every TP rank's shards are whole heads."""
    biases = [lin.bias for lin in linears if lin.bias is not None]
    y = _FusedLinear.apply(x, len(linears), *(lin.weight for lin in linears), *biases)
    return y.split([lin.weight.shape[0] for lin in linears], dim=-1)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by columns (input features); the input arrives split."""

    def __init__(self, in_features: int, out_features: int, mesh: Mesh, *, bias: bool = False,
                 std: float = 0.02, sequence_parallel: bool = False):
        super().__init__()
        self.mesh, self.sp = mesh, sequence_parallel
        local = _local(in_features, mesh.tp, "input features")
        self.weight = make_param((out_features, local), ("normal", std), tp_dim=1)
        self.bias = make_param((out_features,), ("zeros",)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.mesh.tp_group
        y = F.linear(x, self.weight)
        y = reduce_scatter_sequence(y, group) if self.sp else reduce_from_tp(y, group)
        if self.bias is not None:
            y = y + sequence_parallel_param(self.bias, self.mesh, self.sp)
        return y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up the ids in its range."""

    def __init__(self, vocab_size: int, dim: int, mesh: Mesh, *, std: float = 0.02,
                 sequence_parallel: bool = False):
        super().__init__()
        self.mesh, self.sp = mesh, sequence_parallel
        self.vocab_start, self.local_vocab = vocab_shard(vocab_size, mesh)
        self.weight = make_param((self.local_vocab, dim), ("normal", std), tp_dim=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mesh.tp == 1:
            return F.embedding(ids, self.weight)
        local_ids = ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.local_vocab)
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        group = self.mesh.tp_group
        return reduce_scatter_sequence(out, group) if self.sp else reduce_from_tp(out, group)
