"""The fused, chunked vocab-parallel LM head + loss on 2 TP ranks (real gloo group) equals the
single-process cross entropy of the full logits: loss, grad of the hidden states, each weight shard."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed.harness import run_ranks

N, D, VOCAB = 29, 16, 64


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=gen), torch.randn(VOCAB, D, generator=gen) * 0.5, \
        torch.randint(0, VOCAB, (N,), generator=gen)


def _rank(rank: int) -> dict:
    from megatrain.parallel.cross_entropy import chunked_head_cross_entropy, vocab_parallel_cross_entropy
    from megatrain.parallel.mappings import copy_to_tp

    dist.init_process_group("gloo")
    group = dist.new_group([0, 1])
    h_full, w_full, targets = _inputs()
    local = VOCAB // 2
    out = {}
    for name, chunk in (("fused", 4), ("one chunk", None), ("unfused", None)):
        h = h_full.clone().requires_grad_()
        w = w_full[rank * local:(rank + 1) * local].clone().requires_grad_()
        x = copy_to_tp(h, group)  # as the head enters the TP region: grad of h summed over ranks
        if name != "unfused":
            loss = chunked_head_cross_entropy(x, w, targets, rank * local, group, chunk)
        else:
            loss = vocab_parallel_cross_entropy(F.linear(x, w), targets, rank * local, group).mean()
        loss.backward()
        out[name] = (loss.detach(), h.grad, w.grad)
    dist.destroy_process_group()
    return out


def test_tp2_chunked_head_loss_matches_full_logits_on_one_process():
    h, w, targets = _inputs()
    h.requires_grad_()
    w.requires_grad_()
    loss = F.cross_entropy(F.linear(h, w), targets)
    loss.backward()
    ranks = run_ranks(2, _rank)
    for kind in ("fused", "one chunk", "unfused"):
        got_w = torch.cat([r[kind][2] for r in ranks])
        for r in ranks:
            torch.testing.assert_close(r[kind][0], loss.detach(), rtol=1e-6, atol=0, msg=kind)
            torch.testing.assert_close(r[kind][1], h.grad, rtol=1e-5, atol=1e-7, msg=kind)
        torch.testing.assert_close(got_w, w.grad, rtol=1e-5, atol=1e-7, msg=kind)
