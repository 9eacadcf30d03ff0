"""Context parallelism: ring and Ulysses attention, and whole models under CP, compute what one process
computes (fp32, real gloo groups)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatrain.config import Layout, ModelConfig
from megatrain.engine.build import init_distributed
from megatrain.model.init import init_parameter
from megatrain.model.transformer import Transformer
from megatrain.parallel import context
from megatrain.parallel.context import ring_attention, ulysses_attention, zigzag_positions
from megatrain.parallel.mesh import Mesh
from tests.distributed.harness import run_ranks
from tests.distributed.workloads import TINY, assert_same_curve, engine_losses, loss_and_full_gradients, make_config


def _attention_errors(rank: int, cases: list[tuple[str, int, int, int]]) -> list[list[float]]:
    """Per case (mode, heads, kv heads, seq): max error of output, dq, dk, dv on this rank's zigzag chunks
    against SDPA over the whole sequence, relative to the largest reference value."""
    init_distributed(torch.device("cpu"))  # through DeepSpeed: Ulysses runs its all-to-all on DeepSpeed's comm
    cp = dist.get_world_size()
    errors = []
    for mode, heads, kv_heads, seq in cases:
        gen = torch.Generator().manual_seed(seq + heads + kv_heads)
        q, k, v = (torch.randn(2, n, seq, 8, generator=gen).requires_grad_() for n in (heads, kv_heads, kv_heads))
        dy = torch.randn(2, heads, seq, 8, generator=gen)
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads).backward(dy)
        reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
        pos = zigzag_positions(seq, cp, rank)
        # ring: both block paths, the CPU flash kernel's and the portable tiled one
        for context.CPU_FLASH_KERNEL in ((True, False) if mode == "ring" else (True,)):
            mine = [x.detach()[:, :, pos].clone().requires_grad_() for x in (q, k, v)]
            y = (ring_attention if mode == "ring" else ulysses_attention)(*mine, None)
            y.backward(dy[:, :, pos])
            errors.append([(got - want[:, :, pos]).abs().max().item() / want.abs().max().item() for got, want in
                           zip((y, *(x.grad for x in mine)), (reference, q.grad, k.grad, v.grad))])
    context.CPU_FLASH_KERNEL = True
    return errors


def _assert_attention_exact(cases: list, rank_errors: list) -> None:
    runs = [case for case in cases for _ in range(2 if case[0] == "ring" else 1)]
    for errors in rank_errors:
        assert len(errors) == len(runs)
        for case, case_errors in zip(runs, errors):
            assert max(case_errors) < 1e-5, f"{case}: relative errors (out, dq, dk, dv) {case_errors}"


def test_ring_attention_matches_sdpa_forward_and_backward_mha_gqa_mqa():
    # cp=3: every kind of ring step (own block, earlier rank's, later rank's) and a hop count > 2
    cases = [("ring", 4, 2, 24), ("ring", 4, 1, 12), ("ring", 3, 3, 12)]
    _assert_attention_exact(cases, run_ranks(3, _attention_errors, cases))


# 8 heads, 4 KV heads: Ulysses under TP2 x CP2 needs the KV heads per TP rank divisible by CP
CP_MODEL = dict(TINY, n_heads=8, n_kv_heads=4)
STEPS = 2
ULYSSES_CASES = [("ulysses", 4, 2, 16), ("ulysses", 2, 2, 8)]  # GQA and MHA, checked in the CP2 spawn


def _cfg(checkpointing: str = "none", **parallel):
    return make_config(CP_MODEL, train=dict(precision="fp32", micro_batch_size=2, global_batch_size=8, seq_len=32,
                                            grad_clip=0.05, activation_checkpointing=checkpointing),
                       parallel=parallel)


def _cp_runs(rank: int, configs: list, gradient_layouts: list[Layout], attention_cases: tuple = ()) -> dict:
    """In one process group: attention errors per case, the engine's loss curve per config, and the raw
    model's loss and whole gradients per layout."""
    attention = _attention_errors(rank, attention_cases)
    curves = [engine_losses(rank, cfg, STEPS) for cfg in configs]
    gradients = []
    for layout in gradient_layouts:
        mesh = Mesh.build(layout)
        model = Transformer(ModelConfig(**CP_MODEL), mesh, layout.sequence_parallel)
        for name, p in model.named_parameters():
            init_parameter(p, name, seed=7, mesh=mesh)
        gradients.append(loss_and_full_gradients(model, mesh))
    return {"attention": attention, "curves": curves, "gradients": gradients}


@pytest.fixture(scope="module")
def single_process():
    return run_ranks(1, _cp_runs, [_cfg(zero_stage=0)], [Layout()])[0]


def _assert_same_gradients(got: dict, want: dict, rtol: float = 1e-5) -> None:
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    for name, ref in want["grads"].items():
        err = (got["grads"][name] - ref).abs().max()
        assert err <= rtol * ref.abs().max() + 1e-7, f"gradient of {name} differs by {err:.2e}"


@pytest.mark.parametrize("world, configs, layouts, attention_cases", [
    (2, [_cfg("selective", cp=2, zero_stage=1), _cfg("full", cp=2, cp_mode="ulysses", zero_stage=2)],
     [Layout(cp=2), Layout(cp=2, cp_mode="ulysses")], ULYSSES_CASES),
    (4, [_cfg(cp=2, tp=2, sequence_parallel=True, zero_stage=1),
         _cfg("selective", cp=2, tp=2, sequence_parallel=True, cp_mode="ulysses", zero_stage=1),
         _cfg("full", cp=2, zero_stage=3), _cfg(cp=2, cp_mode="ulysses", zero_stage=3)],
     [Layout(cp=2, tp=2, sequence_parallel=True)], ()),
], ids=["cp2", "cp2xtp2-cp2xdp2"])
def test_context_parallel_training_matches_single_process(single_process, world, configs, layouts, attention_cases):
    """CP2, CP2 x TP2 (+SP) and CP2 x DP2 under ZeRO-3, ring and Ulysses, with activation checkpointing:
    the losses and grad norms of every step, and one step's whole gradients, as one process computes
    (and, on CP2, Ulysses attention against SDPA)."""
    ranks = run_ranks(world, _cp_runs, configs, layouts, attention_cases)
    _assert_attention_exact(attention_cases, [rank["attention"] for rank in ranks])
    for rank in ranks:
        for curve in rank["curves"]:
            assert_same_curve(curve, single_process["curves"][0])
        for gradients in rank["gradients"]:
            _assert_same_gradients(gradients, single_process["gradients"][0])
