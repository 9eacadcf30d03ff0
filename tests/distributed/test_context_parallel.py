"""Context parallelism: ring and Ulysses attention, and whole models under CP, compute what one process
computes (fp32, real gloo groups)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatrain.engine.build import init_distributed
from megatrain.parallel.context import ring_attention, ulysses_attention, zigzag_positions
from tests.distributed.harness import run_ranks


def _attention_errors(rank: int, cases: list[tuple[str, int, int, int]]) -> list[list[float]]:
    """Per case (mode, heads, kv heads, seq): max error of output, dq, dk, dv on this rank's zigzag chunks
    against SDPA over the whole sequence."""
    init_distributed(torch.device("cpu"))  # through DeepSpeed: Ulysses runs its all-to-all on DeepSpeed's comm
    cp = dist.get_world_size()
    errors = []
    for mode, heads, kv_heads, seq in cases:
        gen = torch.Generator().manual_seed(seq + heads + kv_heads)
        q, k, v = (torch.randn(2, n, seq, 8, generator=gen).requires_grad_() for n in (heads, kv_heads, kv_heads))
        dy = torch.randn(2, heads, seq, 8, generator=gen)
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads).backward(dy)
        pos = zigzag_positions(seq, cp, rank)
        mine = [x.detach()[:, :, pos].clone().requires_grad_() for x in (q, k, v)]
        y = (ring_attention if mode == "ring" else ulysses_attention)(*mine, None)
        y.backward(dy[:, :, pos])
        reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
        errors.append([(got - want[:, :, pos]).abs().max().item() / want.abs().max().item() for got, want in
                       zip((y, *(x.grad for x in mine)), (reference, q.grad, k.grad, v.grad))])
    dist.destroy_process_group()
    return errors


def test_ring_attention_matches_sdpa_forward_and_backward_mha_gqa_mqa():
    # cp=3: every kind of ring step (own block, earlier rank's, later rank's) and a hop count > 2
    cases = [("ring", 4, 2, 24), ("ring", 4, 1, 12), ("ring", 3, 3, 12)]
    for rank_errors in run_ranks(3, _attention_errors, cases):
        for case, errors in zip(cases, rank_errors):
            assert max(errors) < 1e-5, f"{case}: relative errors (out, dq, dk, dv) {errors}"
