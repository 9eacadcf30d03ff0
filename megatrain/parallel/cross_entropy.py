"""Cross entropy over vocab-parallel logits, never gathering the full vocabulary.

Each TP rank holds logits for its slice of the vocabulary; the softmax normaliser, the max
(for stability) and the target logit are combined with all-reduces of [tokens] tensors.

`chunked_head_cross_entropy` fuses the LM head with the loss: it computes the logits of a chunk of
tokens, turns them into loss and gradients (of the hidden states and of the head weight) and drops
them before the next chunk, so loss memory is bounded by chunk x vocab/TP, not tokens x vocab/TP.
`vocab_parallel_cross_entropy` takes logits that already exist (the pipeline's last stage).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatrain.parallel.mappings import group_size


def _softmax_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                  group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss from fp32 logits [n, vocab/tp] that the caller owns: they are overwritten
    in place by the softmax (one fp32 buffer instead of three). Returns (loss, softmax, local
    targets, hit), hit marking the tokens whose target is in this rank's slice."""
    logits_max = logits.max(dim=-1).values
    if group_size(group) > 1:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits.sub_(logits_max.unsqueeze(-1))

    local_vocab = logits.shape[-1]
    local_targets = targets - vocab_start
    outside = (local_targets < 0) | (local_targets >= local_vocab)
    local_targets = local_targets.masked_fill(outside, 0)
    target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1)
    target_logit = target_logit.masked_fill(outside, 0.0)

    exp = shifted.exp_()
    sum_exp = exp.sum(dim=-1)
    if group_size(group) > 1:
        both = torch.stack([target_logit, sum_exp])  # one all-reduce for the two sums
        dist.all_reduce(both, group=group)
        target_logit, sum_exp = both[0], both[1]
    loss = sum_exp.log() - target_logit
    softmax = exp.div_(sum_exp.unsqueeze(-1))
    return loss, softmax, local_targets, (~outside).to(softmax.dtype)


def _logits_grad(softmax: torch.Tensor, local_targets: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """d loss / d logits = softmax - one_hot(target) on this rank's slice, in place of the softmax."""
    return softmax.scatter_add_(-1, local_targets.unsqueeze(-1), -hit.unsqueeze(-1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group):
        ctx.dtype = logits.dtype
        loss, softmax, local_targets, hit = _softmax_loss(
            logits.to(torch.float32, copy=True), targets, vocab_start, group)
        ctx.save_for_backward(softmax, local_targets, hit)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad = _logits_grad(*ctx.saved_tensors)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                                 group: dist.ProcessGroup | None) -> torch.Tensor:
    """Per-token loss [*] from logits [*, vocab/tp] (this rank's slice starting at vocab_start)."""
    return _VocabParallelCrossEntropy.apply(logits, targets, vocab_start, group)


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Mean loss of softmax(h W^T); the gradients are computed in forward, chunk by chunk.

    The output is a scalar, so backward only scales the saved gradients: no logits are kept and
    none are recomputed (the head's FLOPs stay those of an unfused head)."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_start, group, chunk, need_grad):
        n = h.shape[0]
        grad_h = torch.empty_like(h) if need_grad else None
        # In the weight's dtype, added to chunk by chunk (as Liger-Kernel's fused loss does): an fp32
        # accumulator would cost two weight-sized buffers under bf16.
        grad_w = torch.zeros_like(weight) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, chunk):
            h_c = h[start:start + chunk]
            loss, softmax, local_targets, hit = _softmax_loss(
                F.linear(h_c, weight).float(), targets[start:start + chunk], vocab_start, group)
            total += loss.sum()
            # Scaled by 1/n here (the mean's gradient) before the cast, as the unfused head is.
            g = _logits_grad(softmax, local_targets, hit).div_(n).to(h.dtype) if need_grad else None
            del softmax  # under bf16 the fp32 chunk goes before the matmuls
            if need_grad:
                torch.mm(g, weight, out=grad_h[start:start + chunk])
                grad_w.addmm_(g.t(), h_c)
                del g  # before the next chunk's logits are made
        if need_grad:  # saved like activations, so saved-tensor hooks (and the planner's test) see them
            ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # No test for grad_loss == 1: reading it would synchronise a GPU.
        grad_h, grad_w = grad_h.mul_(grad_loss.to(grad_h.dtype)), grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None, None, None


def chunked_head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                               group: dist.ProcessGroup | None, chunk_tokens: int | None) -> torch.Tensor:
    """Mean next-token loss of the LM head `weight` [vocab/tp, d] (this rank's slice from vocab_start)
    on hidden states h [*, d] (already in the TP region) against targets [*].

    Logits exist for at most `chunk_tokens` tokens at a time (None: all at once)."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    chunk = chunk_tokens or h.shape[0]
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _ChunkedHeadCrossEntropy.apply(h, weight, targets, vocab_start, group, chunk, need_grad)
