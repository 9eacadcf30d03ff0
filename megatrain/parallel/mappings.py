"""Communication as autograd functions: what tensor parallelism inserts between its layers.

Each op has a forward collective and the backward one that makes gradients right (Megatron's
`mappings.py`): copy / all-reduce on entry and exit of a TP region, all-gather / reduce-scatter along
the sequence under sequence parallelism. Activations are [batch, seq, hidden]; the sequence is dim 1.
With a group of one rank every op is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SEQ_DIM = 1


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group_size(group) > 1:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The ranks' chunks joined along `dim`, received into one buffer (all_gather_into_tensor: no list of
    parts, no cat) with `dim` outermost, returned as a view with `dim` back in place (free when the dims
    before it have size 1, e.g. micro-batch 1 under [batch, seq, hidden])."""
    n = group_size(group)
    if n == 1:
        return x
    chunk = x.movedim(dim, 0).contiguous()
    out = chunk.new_empty((n * chunk.shape[0], *chunk.shape[1:]))
    dist.all_gather_into_tensor(out, chunk, group=group)
    return out.movedim(0, dim)


def _split(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=dim)[dist.get_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over ranks, this rank's chunk along `dim` kept: reduce_scatter_tensor with `dim` outermost (NCCL and,
    in torch 2.13, gloo: the same path in CPU tests), made contiguous with `dim` back in place: the result is
    the residual stream, which pipeline sends need contiguous (a copy of the shard only when micro-batch > 1)."""
    n = group_size(group)
    if n == 1:
        return x
    full = x.movedim(dim, 0).contiguous()
    out = full.new_empty((full.shape[0] // n, *full.shape[1:]))
    dist.reduce_scatter_tensor(out, full, group=group)
    return out.movedim(0, dim).contiguous()


def gather_shards(x: torch.Tensor, group: dist.ProcessGroup | None, async_op: bool = False
                  ) -> tuple[torch.Tensor, dist.Work | None]:
    """The ranks' sequence shards [b, s/n, h] stacked rank-major, [n, b, s/n, h]: all_gather_into_tensor's own
    layout, so the shard is sent as it is and nothing is copied before or after (for any micro-batch size).
    With `async_op` the gather runs while the caller computes; wait on the returned work before reading."""
    n = group_size(group)
    x = x.contiguous()
    parts = x.new_empty((n * x.shape[0], *x.shape[1:]))
    work = dist.all_gather_into_tensor(parts, x, group=group, async_op=async_op)
    return parts.view(n, *x.shape), work


def reduce_scatter_shards(parts: torch.Tensor, group: dist.ProcessGroup | None, async_op: bool = False
                          ) -> tuple[torch.Tensor, dist.Work | None]:
    """The inverse of `gather_shards`: rank-major [n, b, s/n, h] summed over ranks, this rank's [b, s/n, h]
    kept; the input is already reduce_scatter_tensor's layout, so nothing is copied."""
    out = parts.new_empty(parts.shape[1:])
    work = dist.reduce_scatter_tensor(out, parts.flatten(0, 1), group=group, async_op=async_op)
    return out, work


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
    return _CopyToTP.apply(x, group) if group_size(group) > 1 else x


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group) if group_size(group) > 1 else x


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _GatherSeq.apply(x, group) if group_size(group) > 1 else x


def reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _ReduceScatterSeq.apply(x, group) if group_size(group) > 1 else x


def scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _ScatterSeq.apply(x, group) if group_size(group) > 1 else x


def gather_last_dim(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _GatherLast.apply(x, group) if group_size(group) > 1 else x
