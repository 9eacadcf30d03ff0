"""Expert parallelism: tokens travel to the EP rank that computes their expert and back, by all-to-all.

The EP group (parallel/mesh.py) is ep adjacent data-parallel ranks; rank r of it computes experts
[r * E / ep, (r + 1) * E / ep). A rank sends its routed token copies sorted by expert, so the copies for
each destination are contiguous, and receives, from every source in turn, that source's copies of its own
experts (source-major). `to_expert_major` regroups them by expert for the expert GEMMs and
`to_source_major` undoes it before the copies go back. With a group of one rank nothing moves.

Split sizes are host integers (all_to_all_single needs them): one small count exchange per MoE layer per
micro-batch, the price of dropless routing without a capacity factor (Megatron-Core pays it too).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatrain.parallel.mappings import group_size


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows of x go to the ranks by `send` counts, `recv` come back; backward sends the gradients home."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Differentiable all-to-all of rows: `send[r]` rows to rank r, `recv[r]` rows from it."""
    return _AllToAll.apply(x, send, recv, group) if group_size(group) > 1 else x


class Dispatch:
    """Where the routed copies of this rank's tokens go and what comes back, for one MoE layer call.

    `counts[e]`: this rank's copies for global expert e (a device tensor). After the count exchange,
    `recv_counts[s][j]` (host ints) is what source s sends for local expert j.
    """

    def __init__(self, counts: torch.Tensor, group: dist.ProcessGroup | None):
        self.group, ep = group, group_size(group)
        local = counts.numel() // ep
        mine = counts.view(ep, local)
        theirs = mine.clone()
        if ep > 1:
            dist.all_to_all_single(theirs, mine.contiguous(), group=group)
        host = torch.stack([mine, theirs]).tolist()  # one device-to-host read for both
        self.send = [sum(row) for row in host[0]]
        self.recv_counts: list[list[int]] = host[1]
        self.recv = [sum(row) for row in self.recv_counts]
        self.local_experts = local

    def expert_sizes(self) -> list[int]:
        """Rows per local expert once regrouped (expert-major)."""
        return [sum(row[j] for row in self.recv_counts) for j in range(self.local_experts)]

    def to_expert_major(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.split([n for row in self.recv_counts for n in row])
        ep, local = len(self.recv_counts), self.local_experts
        return torch.cat([chunks[s * local + j] for j in range(local) for s in range(ep)])

    def to_source_major(self, y: torch.Tensor) -> torch.Tensor:
        ep, local = len(self.recv_counts), self.local_experts
        chunks = y.split([self.recv_counts[s][j] for j in range(local) for s in range(ep)])
        return torch.cat([chunks[j * ep + s] for s in range(ep) for j in range(local)])

    def send_out(self, x: torch.Tensor) -> torch.Tensor:
        return all_to_all(x, self.send, self.recv, self.group)

    def send_back(self, y: torch.Tensor) -> torch.Tensor:
        return all_to_all(y, self.recv, self.send, self.group)
