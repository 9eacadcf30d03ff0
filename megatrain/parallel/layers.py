"""Megatron-style tensor-parallel layers.

Column-parallel linears split the output features across TP ranks, row-parallel linears the
input features; a column followed by a row needs one all-reduce forward and one backward.
With sequence parallelism the activations between those pairs are split along the sequence
(dim 1 of [batch, seq, hidden]) and the all-reduces become all-gather / reduce-scatter.

Every sharded parameter carries `tp_dim` (the dim split across TP ranks; None: replicated) and
`init` (how to initialise the *full* tensor), so initialisation, export and consolidation are
the same for every layout. DeepSpeed reads `model_parallel` / `tensor_model_parallel` to
count each element once in the gradient norm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatrain.parallel.mesh import Mesh

SEQ_DIM = 1


def _size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if _size(group) > 1:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=dim)[dist.get_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    # gloo has no reduce_scatter; all-reduce then keep our chunk is exact, only costlier.
    if _size(group) > 1 and dist.get_backend(group) == "nccl":
        parts = [p.contiguous() for p in x.chunk(_size(group), dim=dim)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=group)
        return out
    return _split(_all_reduce(x, group), dim, group)


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (input of a column-parallel op)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward (output of a row-parallel op)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSeq(torch.autograd.Function):
    """All-gather along the sequence forward; reduce-scatter backward (SP -> TP region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, SEQ_DIM, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    """Reduce-scatter along the sequence forward; all-gather backward (TP -> SP region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, SEQ_DIM, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    """Keep this rank's sequence chunk forward; all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, SEQ_DIM, ctx.group), None


class _GatherLast(torch.autograd.Function):
    """All-gather along the last dim forward; keep our chunk backward (full logits for sampling)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _CopyToTP.apply(x, group) if _size(group) > 1 else x


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group) if _size(group) > 1 else x


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _GatherSeq.apply(x, group) if _size(group) > 1 else x


def reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _ReduceScatterSeq.apply(x, group) if _size(group) > 1 else x


def scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _ScatterSeq.apply(x, group) if _size(group) > 1 else x


def gather_last_dim(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _GatherLast.apply(x, group) if _size(group) > 1 else x


def sequence_parallel_param(p: torch.Tensor, mesh: Mesh, sp: bool) -> torch.Tensor:
    """A replicated parameter used on a sequence shard: its gradient is summed across TP ranks."""
    return copy_to_tp(p, mesh.tp_group) if sp else p


def make_param(shape: tuple[int, ...], init: tuple, tp_dim: int | None = None) -> nn.Parameter:
    """An uninitialised parameter with the metadata that layout-independent init needs."""
    p = nn.Parameter(torch.empty(shape))
    p.init = init
    p.tp_dim = tp_dim
    if tp_dim is not None:
        p.model_parallel = p.tensor_model_parallel = True
        p.partition_dim = tp_dim
    return p


def _local(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what}={n} is not divisible by tensor-parallel size {tp}")
    return n // tp


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
            group = self.mesh.tp_group
            x = gather_sequence(x, group) if self.sp else copy_to_tp(x, group)
        return F.linear(x, self.weight, self.bias)


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
        self.local_vocab = _local(vocab_size, mesh.tp, "vocab size")
        self.vocab_start = mesh.tp_rank * self.local_vocab
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
