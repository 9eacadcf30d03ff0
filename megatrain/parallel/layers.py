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

from megatrain.parallel.mappings import (
    copy_to_tp,
    gather_sequence,
    gather_shards,
    reduce_from_tp,
    reduce_scatter_sequence,
    reduce_scatter_shards,
)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x in the residual layout: this rank's sequence shard under SP."""
        return fused_column_linear(x, [self])[0]


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


def _token_blocks(full: torch.Tensor, parts: torch.Tensor):
    """The same tokens in two layouts, block by block: (full[i, rank r's rows], parts[r, i]) for every rank r
    and micro-batch row i, `full` [b, s, *] token-major, `parts` [n, b, s/n, *] rank-major (the gather's)."""
    n, b, chunk = parts.shape[:3]
    for r in range(n):
        for i in range(b):
            yield full[i, r * chunk:(r + 1) * chunk], parts[r, i]


class _SequenceParallelLinear(torch.autograd.Function):
    """Column-parallel linears (fused: x [W1; W2; ...]^T) on a sequence shard, as Megatron-Core's
    LinearWithGradAccumulationAndAsyncCommunication: forward all-gathers the shard and does the GEMM, saving
    only the shard (1/TP of the gathered input) and the separate weights. Backward re-gathers the shard while
    the grad-input GEMM runs, then reduce-scatters grad-input while the grad-weight GEMM runs.

    The collectives use their rank-major layout [n, b, s/n, h] (`gather_shards`) and the forward and grad-input
    GEMMs run one (rank, row) block at a time between it and the model's [b, s, *], so neither copies; only the
    grad-weight GEMM, one reduction over all tokens, reads the gathered input token-major (a transient copy
    when micro-batch > 1)."""

    @staticmethod
    def forward(ctx, x, group, n_weights, *params):
        weights, biases = params[:n_weights], params[n_weights:]
        ctx.group, ctx.n_weights, ctx.has_bias = group, n_weights, bool(biases)
        ctx.save_for_backward(x, *weights)
        weight = torch.cat(weights) if n_weights > 1 else weights[0]
        parts, _ = gather_shards(x, group)
        n, b, chunk, _ = parts.shape
        y = x.new_empty((b, n * chunk, weight.shape[0]))
        for out, inp in _token_blocks(y, parts):
            torch.mm(inp, weight.t(), out=out)
        if biases:
            y += torch.cat(biases)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        sizes = [w.shape[0] for w in weights]
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        grad = grad.contiguous()
        parts, gathering = gather_shards(x, ctx.group, async_op=True)
        grad_parts = grad.new_empty((*parts.shape[:3], weight.shape[1]))
        for g, out in _token_blocks(grad, grad_parts):  # overlaps the re-gather
            torch.mm(g, weight, out=out)
        gathering.wait()
        grad_x, scattering = reduce_scatter_shards(grad_parts, ctx.group, async_op=True)
        tokens = parts.transpose(0, 1).reshape(-1, parts.shape[-1])  # a view at micro-batch 1
        flat = grad.view(-1, grad.shape[-1])
        grad_w = (flat.t() @ tokens).split(sizes)  # overlaps the reduce-scatter
        grad_b = flat.sum(0).split(sizes) if ctx.has_bias else ()
        scattering.wait()
        return grad_x, None, None, *grad_w, *grad_b


def fused_column_linear(x: torch.Tensor, linears: list[ColumnParallelLinear]) -> tuple[torch.Tensor, ...]:
    """The outputs of column-parallel linears that share their input x, computed as one GEMM. x is in the
    residual layout: this rank's sequence shard under SP (gathered inside, only the shard saved), else the whole
    sequence (entering the TP region here). Each linear keeps its own parameter, so checkpoints, init and
    export see the separate q/k/v (gate/up) weights; every TP rank's shards are whole heads."""
    mesh, sp = linears[0].mesh, linears[0].sp
    biases = [lin.bias for lin in linears if lin.bias is not None]
    weights = [lin.weight for lin in linears]
    if sp and mesh.tp > 1:
        y = _SequenceParallelLinear.apply(x, mesh.tp_group, len(linears), *weights, *biases)
    else:
        y = _FusedLinear.apply(copy_to_tp(x, mesh.tp_group), len(linears), *weights, *biases)
    return y.split([w.shape[0] for w in weights], dim=-1)


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
