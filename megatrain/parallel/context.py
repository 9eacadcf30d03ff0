"""Context parallelism (CP): each sample's sequence split across the CP group.

Load balance: the sequence is cut into 2 x cp chunks and CP rank r holds chunks r and 2cp-1-r
("zigzag", as Megatron-Core and ring-flash-attention do), so under a causal mask every rank does
the same attention work. Everything outside attention is per token and runs on the local tokens;
attention needs every earlier token, which comes one of two ways:

- ring (`ring_attention`): K/V blocks travel around the CP ring by point-to-point sends while each
  rank attends its queries to the block it holds; partial outputs are merged by their log-sum-exp
  (online softmax). The backward is a second ring pass that carries each block's dK/dV along with it
  and hands them back to the block's owner after cp hops.
- Ulysses (`ulysses_attention`): DeepSpeed's sequence-parallel attention all-to-alls heads for
  sequence, so each rank attends the whole sequence on heads/cp heads (heads must divide by cp).

Gradient reduction: DeepSpeed averages gradients over DP x CP (its "sequence data parallel" group,
from the mesh's mpu), so each rank's gradient is that of the mean over its own tokens: with equal
token counts per rank the average over CP is the gradient of the mean over the whole sequence.
`cp_mean_loss` reports that exact mean and passes the gradient of the local mean through unscaled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

QUERY_TILE = 1024  # query rows whose scores exist at once: memory per block is tile x keys, not keys^2
# On the CPU each block runs torch's flash kernel, which returns the log-sum-exp the merge needs and keeps
# no scores (aten's _scaled_dot_product_flash_attention_for_cpu and its backward: torch internals, kept
# to the two functions below). False: the portable tiled path that other devices run (tests run both).
CPU_FLASH_KERNEL = True


def zigzag_positions(seq_len: int, cp: int, cp_rank: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions of the tokens CP rank `cp_rank` holds: chunks r and 2cp-1-r of 2 x cp, ascending."""
    chunk = seq_len // (2 * cp)
    head, tail = cp_rank * chunk, (2 * cp - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(head, head + chunk, device=device), torch.arange(tail, tail + chunk, device=device)])


class _CpMeanLoss(torch.autograd.Function):
    """Forward: the mean over the CP group of equal-count local means (= the mean over all tokens).
    Backward: the gradient of the local mean, unscaled; the reduction averages it over CP."""

    @staticmethod
    def forward(ctx, local_mean, group):
        total = local_mean.detach().clone()
        dist.all_reduce(total, group=group)
        return total / dist.get_world_size(group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def cp_mean_loss(local_mean: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The loss over the whole sequence from this rank's mean over its (equally many) tokens."""
    return _CpMeanLoss.apply(local_mean, group)


# ---- ring attention -------------------------------------------------------------------------------------

def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, row0: int) -> torch.Tensor:
    """fp32 scores of query rows [row0, row0 + t) against all keys; causal by index (same offsets)."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if causal:
        rows = torch.arange(row0, row0 + q.shape[-2], device=q.device)
        cols = torch.arange(k.shape[-2], device=q.device)
        s.masked_fill_(cols[None, :] > rows[:, None], float("-inf"))
    return s


def _heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, hk, 1 or g, s, d] -> [b, hk * g, s, d], K/V repeated for each query head of their group."""
    b, hk, _, s, d = x.shape
    return x.expand(b, hk, groups, s, d).reshape(b, hk * groups, s, d)


def _block_forward(q, k, v, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [b, hk, g, sq, d] on one K/V block [b, hk, 1, sk, d]: (output, log-sum-exp)."""
    if CPU_FLASH_KERNEL and q.device.type == "cpu":
        g = q.shape[2]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads(q, g), _heads(k, g), _heads(v, g), 0.0, causal, scale=scale)
        return out.view(q.shape), lse.view(q.shape[:-1])
    outs, lses = [], []
    for t0 in range(0, q.shape[-2], QUERY_TILE):
        s = _scores(q[..., t0:t0 + QUERY_TILE, :], k, scale, causal, t0)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(s.sub_(lse.unsqueeze(-1)).exp_(), v))
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def _block_backward(q, k, v, out, dout, lse, scale: float, causal: bool) -> tuple[torch.Tensor, ...]:
    """Gradients of one block: flash attention's backward from the final output and log-sum-exp."""
    g = q.shape[2]
    if CPU_FLASH_KERNEL and q.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads(dout, g), _heads(q, g), _heads(k, g), _heads(v, g), _heads(out, g), lse.reshape(lse.shape[0], -1,
            lse.shape[-1]), 0.0, causal, scale=scale)
        return (dq.view(q.shape), dk.view(*k.shape[:2], g, *k.shape[3:]).sum(2, keepdim=True),
                dv.view(*v.shape[:2], g, *v.shape[3:]).sum(2, keepdim=True))
    delta = (dout * out).sum(-1)
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for t0 in range(0, q.shape[-2], QUERY_TILE):
        rows = slice(t0, t0 + QUERY_TILE)
        q_t, do_t = q[..., rows, :], dout[..., rows, :]
        p = _scores(q_t, k, scale, causal, t0).sub_(lse[..., rows].unsqueeze(-1)).exp_()
        dv += torch.matmul(p.transpose(-1, -2), do_t).sum(2, keepdim=True)
        ds = p.mul_(torch.matmul(do_t, v.transpose(-1, -2)).sub_(delta[..., rows].unsqueeze(-1)))
        dq[..., rows, :] = torch.matmul(ds, k).mul_(scale)
        dk += torch.matmul(ds.transpose(-1, -2), q_t).sum(2, keepdim=True).mul_(scale)
    return dq, dk, dv


class _Ring:
    """This rank's place in the CP ring: blocks go to the next rank and come from the previous one."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size) if group is not None else \
            (self.rank + 1) % self.size
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size) if group is not None else \
            (self.rank - 1) % self.size

    def pass_on(self, tensor: torch.Tensor, tag: int = 0) -> tuple[torch.Tensor, list]:
        """Start sending `tensor` to the next rank and receiving the previous rank's; wait on the works.
        Messages in flight together need distinct tags: K/V and dK/dV blocks have the same shape."""
        received = torch.empty_like(tensor)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, self.next, self.group, tag),
                                        dist.P2POp(dist.irecv, received, self.prev, self.group, tag)])
        return received, works

    def src(self, step: int) -> int:
        """The CP rank whose K/V block this rank holds at ring step `step`."""
        return (self.rank - step) % self.size


def _zigzag_slices(step_src: int, rank: int, local: int) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal) of the work at a ring step: the own block is causal; an earlier
    rank's block is seen whole by all queries through its head chunk only; a later rank's block is
    seen whole, both chunks, by the tail chunk of queries only."""
    half = local // 2
    if step_src == rank:
        return slice(None), slice(None), True
    if step_src < rank:
        return slice(None), slice(0, half), False
    return slice(half, None), slice(None), False


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group):
        ring = _Ring(group)
        b, h, s, d = q.shape
        hk = k.shape[1]
        scale = d ** -0.5
        q32 = q.float().view(b, hk, h // hk, s, d)
        kv = torch.stack([k.float(), v.float()]).unsqueeze(3).contiguous()  # [2, b, hk, 1, s, d]: one message
        out = torch.zeros_like(q32)
        lse = torch.full(q32.shape[:-1], float("-inf"), device=q.device)
        for step in range(ring.size):
            if step + 1 < ring.size:  # the next block travels while this one is attended
                incoming, works = ring.pass_on(kv)
            rows, keys, causal = _zigzag_slices(ring.src(step), ring.rank, s)
            o_b, lse_b = _block_forward(q32[..., rows, :], kv[0][..., keys, :], kv[1][..., keys, :], scale, causal)
            merged = torch.logaddexp(lse[..., rows], lse_b)
            out[..., rows, :] = (out[..., rows, :] * (lse[..., rows] - merged).exp().unsqueeze(-1)
                                 + o_b * (lse_b - merged).exp().unsqueeze(-1))
            lse[..., rows] = merged
            if step + 1 < ring.size:
                for work in works:
                    work.wait()
                kv = incoming
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group = group
        return out.view(b, h, s, d).to(q.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        b, h, s, d = q.shape
        hk = k.shape[1]
        scale = d ** -0.5
        q32 = q.float().view(b, hk, h // hk, s, d)
        dout = grad.float().reshape(out.shape)
        kv = torch.stack([k.float(), v.float()]).unsqueeze(3).contiguous()
        dkv = torch.zeros_like(kv)  # the gradient of the block held, accumulated by every rank it visits
        dq = torch.zeros_like(q32)
        for step in range(ring.size):
            if step + 1 < ring.size:
                incoming, works = ring.pass_on(kv)
            rows, keys, causal = _zigzag_slices(ring.src(step), ring.rank, s)
            dq_b, dk_b, dv_b = _block_backward(q32[..., rows, :], kv[0][..., keys, :], kv[1][..., keys, :],
                                               out[..., rows, :], dout[..., rows, :], lse[..., rows], scale, causal)
            dq[..., rows, :] += dq_b
            dkv[0][..., keys, :] += dk_b
            dkv[1][..., keys, :] += dv_b
            # The block's gradient follows the block; after the last step it reaches the block's owner.
            dkv, dkv_works = ring.pass_on(dkv, tag=1)
            for work in dkv_works + (works if step + 1 < ring.size else []):
                work.wait()
            if step + 1 < ring.size:
                kv = incoming
        dk, dv = dkv.squeeze(3)
        return dq.view(b, h, s, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Causal attention of zigzag-split q [b, h, s/cp, d] on k, v [b, hk, s/cp, d] (hk divides h: MHA, GQA,
    MQA) across the CP `group`; exact (fp32 accumulation), the output in q's dtype."""
    return _RingAttention.apply(q, k, v, group)


# ---- Ulysses ----------------------------------------------------------------------------------------------

def _ulysses_local_attention(cp: int, seq_len: int):
    """The attention each rank runs after the all-to-all: the whole sequence (gathered in CP rank order,
    i.e. zigzag order) on its heads, put back in position order for a causal mask and then restored."""
    order = torch.cat([zigzag_positions(seq_len, cp, r) for r in range(cp)]).argsort()
    restore = order.argsort()

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        q, k, v = (x[:, order.to(x.device)].transpose(1, 2) for x in (q, k, v))  # [b, heads, s, d]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return y.transpose(1, 2)[:, restore.to(y.device)]

    return attend


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      group: dist.ProcessGroup | None) -> torch.Tensor:
    """Causal attention of zigzag-split q [b, h, s/cp, d], k, v [b, hk, s/cp, d] through DeepSpeed's
    DistributedAttention (h and hk divisible by cp)."""
    from deepspeed.sequence.layer import DistributedAttention

    cp = dist.get_world_size(group)
    attention = DistributedAttention(_ulysses_local_attention(cp, q.shape[2] * cp), group,
                                     scatter_idx=2, gather_idx=1)
    # DeepSpeed's layout is [b, s, heads, d] (batch_dim_idx=0): scatter heads, gather sequence.
    y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0)
    return y.transpose(1, 2)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None,
                               mode: str) -> torch.Tensor:
    """Causal attention across the CP group by `mode`: ring | ulysses."""
    return (ring_attention if mode == "ring" else ulysses_attention)(q, k, v, group)
