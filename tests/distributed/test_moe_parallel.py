"""Expert parallelism computes what one process computes (fp32, real gloo groups): EP2, EP2 x DP2, EP2 x TP2.

One spawn per world size; each runs several layouts. Gradients are compared after the data-parallel mean
(what DeepSpeed applies), losses and grad norms through the DeepSpeed engine with ZeRO.
"""

import torch
import torch.distributed as dist

from megatrain.config import Layout, ModelConfig, MoEConfig
from megatrain.model.init import full_shape, init_parameter
from megatrain.model.transformer import Transformer
from megatrain.parallel.mesh import Mesh
from tests.distributed.harness import run_ranks
from tests.distributed.workloads import TINY, assert_same_curve, engine_losses, make_config, synthetic_batches

# Top-2 of 4 experts, a shared expert, the first block dense; every balancing term on, so each must be
# layout-independent (the selection bias moves every step, from the load summed over DP).
MOE = dict(TINY, moe=MoEConfig(experts=4, top_k=2, shared_experts=1, expert_ffn_hidden=32, first_dense_layers=1,
                               aux_loss_coef=0.01, z_loss_coef=1e-3, bias_update_rate=0.01))
BATCH = 8


def dp_mean_gradients(rank: int, layouts: list[dict]) -> list[dict]:
    """Per layout: one forward/backward of the raw model on this DP rank's slice of a batch, then the
    DP mean of every gradient (TP shards gathered) and of the loss."""
    dist.init_process_group("gloo")
    cfg = ModelConfig(**MOE)
    batch = synthetic_batches(1, BATCH, 32, cfg.vocab_size)[0]
    out = []
    for parallel in layouts:
        tp, ep = parallel.get("tp", 1), parallel.get("ep", 1)
        mesh = Mesh.build(Layout(tp=tp, dp=dist.get_world_size() // tp, ep=ep))
        model = Transformer(cfg, mesh)
        for name, p in model.named_parameters():
            init_parameter(p, name, seed=7, mesh=mesh)
        per = BATCH // mesh.dp
        mine = batch[mesh.dp_rank * per:(mesh.dp_rank + 1) * per]
        loss = model(mine[:, :-1], mine[:, 1:])
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g, group=mesh.dp_group)
            g /= mesh.dp
            if p.tp_dim is not None and tp > 1:
                parts = [torch.empty_like(g) for _ in range(tp)]
                dist.all_gather(parts, g.contiguous(), group=mesh.tp_group)
                g = torch.cat(parts, dim=p.tp_dim)
            assert list(g.shape) == full_shape(p, tp)
            grads[name] = g
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=mesh.dp_group)
        out.append({"loss": loss.item() / mesh.dp, "grads": grads})
    dist.destroy_process_group()
    return out


def _assert_same_gradients(reference: dict, other: dict, rtol: float = 1e-5) -> None:
    assert other["grads"].keys() == reference["grads"].keys()
    for name, ref in reference["grads"].items():
        err = (other["grads"][name] - ref).abs().max()
        assert err <= rtol * ref.abs().max() + 1e-8, f"gradient of {name} differs by {err:.2e}"
    assert abs(other["loss"] - reference["loss"]) <= 1e-6 * abs(reference["loss"])


def _engine_cfg(**parallel):
    return make_config(model=MOE, train=dict(precision="fp32", micro_batch_size=2, global_batch_size=BATCH,
                                             seq_len=32, grad_clip=0.05), parallel=parallel)


def ranks_run(rank: int, layouts: list[dict], engine_layouts: list[dict]) -> dict:
    grads = dp_mean_gradients(rank, layouts)
    curves = [engine_losses(rank, _engine_cfg(**parallel), 3) for parallel in engine_layouts]
    return {"grads": grads, "curves": curves}


def test_expert_parallel_layouts_match_one_process():
    reference = run_ranks(1, ranks_run, [{}], [dict(zero_stage=0)])[0]
    two = run_ranks(2, ranks_run, [dict(ep=2)], [])
    four = run_ranks(4, ranks_run, [dict(ep=2), dict(ep=2, tp=2)], [dict(ep=2, tp=2, zero_stage=2)])
    for result in (two[0], four[0]):
        for grads in result["grads"]:
            _assert_same_gradients(reference["grads"][0], grads)
        for curve in result["curves"]:
            assert_same_curve(curve, reference["curves"][0])
    assert all(r["curves"] == two[0]["curves"] for r in two) and all(r["curves"] == four[0]["curves"] for r in four)


def test_routing_differs_between_layers_so_the_check_is_not_vacuous():
    """The reference routes tokens to several experts (an all-to-one routing would hide dispatch errors)."""
    cfg = ModelConfig(**MOE)
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        init_parameter(p, name, seed=7, mesh=Mesh.single())
    batch = synthetic_batches(1, BATCH, 32, cfg.vocab_size)[0]
    model(batch[:, :-1], batch[:, 1:])
    load = model.blocks[1].mlp.load
    assert (load > 0).all() and load.sum() == BATCH * 32 * 2
