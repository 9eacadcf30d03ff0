"""Sequence-parallel collectives on 2 gloo ranks: all_gather_into_tensor / reduce_scatter_tensor give the
concatenation and the chunked sum, forward and backward, at micro-batch 1 and above."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.distributed.harness import run_ranks

WORLD = 2


def _x(rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + rank))


def _rank(rank: int) -> dict:
    from megatrain.parallel.mappings import gather_last_dim, gather_sequence, reduce_scatter_sequence

    dist.init_process_group("gloo")
    group = dist.new_group(list(range(WORLD)))
    out = {}
    for batch in (1, 3):
        shape = (batch, 4, 5)
        x = _x(rank, shape).requires_grad_()
        y = gather_sequence(x, group)
        out[f"gather{batch}"] = y.detach().clone()
        out[f"gather{batch}_view_of_one_buffer"] = y._base is not None
        y.backward(_x(10 + rank, (batch, 4 * WORLD, 5)))
        out[f"gather{batch}_grad"] = x.grad.clone()

        z = _x(rank, (batch, 4 * WORLD, 5)).requires_grad_()
        s = reduce_scatter_sequence(z, group)
        out[f"scatter{batch}"] = s.detach().clone()
        s.backward(_x(20 + rank, shape))
        out[f"scatter{batch}_grad"] = z.grad.clone()
    out["last"] = gather_last_dim(_x(rank, (2, 3, 4)), group)
    dist.destroy_process_group()
    return out


def test_sequence_gather_and_reduce_scatter_are_the_concatenation_and_the_chunked_sum():
    ranks = run_ranks(WORLD, _rank)
    for batch in (1, 3):
        shape = (batch, 4, 5)
        gathered = torch.cat([_x(r, shape) for r in range(WORLD)], dim=1)
        summed = sum(_x(r, (batch, 4 * WORLD, 5)) for r in range(WORLD))
        grads_in = sum(_x(10 + r, (batch, 4 * WORLD, 5)) for r in range(WORLD))
        grads_out = torch.cat([_x(20 + r, shape) for r in range(WORLD)], dim=1)
        for rank, got in enumerate(ranks):
            mine = slice(4 * rank, 4 * (rank + 1))
            assert torch.equal(got[f"gather{batch}"], gathered)
            torch.testing.assert_close(got[f"gather{batch}_grad"], grads_in[:, mine])  # reduce-scatter backward
            torch.testing.assert_close(got[f"scatter{batch}"], summed[:, mine])
            assert torch.equal(got[f"scatter{batch}_grad"], grads_out)  # all-gather backward
            assert got[f"gather{batch}_view_of_one_buffer"]  # received in place: no list of parts, no cat
    assert all(torch.equal(r["last"], torch.cat([_x(k, (2, 3, 4)) for k in range(WORLD)], dim=-1)) for r in ranks)
