"""Cross entropy over vocab-parallel logits, never gathering the full vocabulary.

Each TP rank holds logits for its slice of the vocabulary; the softmax normaliser, the max
(for stability) and the target logit are combined with three all-reduces of [tokens] tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatrain.parallel.mappings import group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group):
        ctx.dtype = logits.dtype
        logits = logits.float()
        logits_max = logits.max(dim=-1).values
        if group_size(group) > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        local_vocab = logits.shape[-1]
        local_targets = targets - vocab_start
        outside = (local_targets < 0) | (local_targets >= local_vocab)
        local_targets = local_targets.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if group_size(group) > 1:
            dist.all_reduce(target_logit, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target_logit

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_targets, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_targets, outside = ctx.saved_tensors
        grad = softmax  # d loss / d logits = softmax - one_hot(target), on this rank's slice
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_targets.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                                 group: dist.ProcessGroup | None) -> torch.Tensor:
    """Per-token loss [*] from logits [*, vocab/tp] (this rank's slice starting at vocab_start)."""
    return _VocabParallelCrossEntropy.apply(logits, targets, vocab_start, group)
