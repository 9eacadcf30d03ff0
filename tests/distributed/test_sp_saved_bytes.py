"""What one block keeps for backward under TP2 with and without sequence parallelism (2 gloo ranks, bf16).

The SP column-parallel linear saves its input shard and re-gathers it in backward, so nothing of the gathered
sequence is kept. Without SP every rank holds the whole sequence; with SP the residual-width tensors are
shards. Per token, with a bytes per element, h the hidden size and t = TP, the two differ by exactly
(1 - 1/t) x [2 norms x (a*h input + 4 fp32 1/rms) + 2 column-linear inputs x a*h]; all else (q, k, v, the
attention output and logsumexp, the SwiGLU products, the RoPE tables) is the same in both. Had the linears
kept the gathered copy, the second term would be missing: 2*a*h*(1 - 1/t) more bytes per token under SP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatrain.config import Layout, ModelConfig
from megatrain.plan import layer_activation_bytes
from tests.distributed.harness import run_ranks
from tests.distributed.workloads import TINY

# ffn/t = 96 differs from h = 64: no saved tensor of the gathered input's shape by coincidence
MODEL = dict(TINY, ffn_hidden=192)
BATCH, SEQ, TP = 2, 64, 2


def _saved(rank: int, sp: bool) -> dict:
    from megatrain.model.init import init_parameter
    from megatrain.model.transformer import Block, Context
    from megatrain.parallel.mesh import Mesh

    dist.init_process_group("gloo")
    mesh = Mesh.build(Layout(tp=TP, sequence_parallel=sp))
    cfg = ModelConfig(**MODEL)
    block = Block(cfg, mesh, sp)
    for name, p in block.named_parameters():
        init_parameter(p, f"blocks.0.{name}", seed=7, mesh=mesh)
    block = block.bfloat16().eval()  # eval: no dropout masks
    seq = SEQ // TP if sp else SEQ
    x = torch.randn(BATCH, seq, cfg.d_model, generator=torch.Generator().manual_seed(rank if sp else 0))
    x = x.bfloat16().requires_grad_()
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages: dict[int, int] = {}
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x, Context(cfg, SEQ, x.device, None))
    y.float().square().sum().backward()  # backward runs: the re-gather and reduce-scatter complete
    return {"bytes": sum(storages.values()), "shapes": shapes, "grad_finite": bool(x.grad.isfinite().all())}


def test_sequence_parallel_linears_save_the_shard_not_the_gathered_input():
    tp_only = run_ranks(2, _saved, False)
    sp = run_ranks(2, _saved, True)
    cfg = ModelConfig(**MODEL)
    a, h, tokens = 2, cfg.d_model, BATCH * SEQ
    shard_saving = (1 - 1 / TP) * tokens * (2 * (a * h + 4) + 2 * a * h)
    for rank in range(2):
        print(f"rank {rank}: saved per block TP2 {tp_only[rank]['bytes']} B, TP2+SP {sp[rank]['bytes']} B, "
              f"difference {tp_only[rank]['bytes'] - sp[rank]['bytes']} B (expected {shard_saving:.0f} B)")
        assert sp[rank]["grad_finite"]
        assert tp_only[rank]["bytes"] - sp[rank]["bytes"] == shard_saving
        assert (BATCH, SEQ, h) not in sp[rank]["shapes"]  # no gathered input (or view of one) is saved
        # the planner's per-block figure, exactly, once the RoPE tables (one pair per forward, shared by the
        # blocks: not a per-block cost) are set aside
        rope = 2 * SEQ * cfg.head_dim * 4
        for sp_on, measured in ((False, tp_only[rank]), (True, sp[rank])):
            assert measured["bytes"] - rope == tokens * layer_activation_bytes(cfg, TP, sp_on, "bf16", "none")
