"""Expert parallelism computes what one process computes (fp32, real gloo groups): EP2, EP2 x DP2, EP2 x TP2.

One spawn per world size; each runs several layouts. Gradients are compared after the data-parallel mean
(what DeepSpeed applies), losses and grad norms through the DeepSpeed engine with ZeRO.
"""

import pytest
import torch
import torch.distributed as dist

from megatrain.config import Layout, ModelConfig, MoEConfig
from megatrain.model.init import full_shape, init_parameter, shard
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
    DP mean of every gradient and of the loss: dense gradients averaged over DP (TP shards gathered), routed
    experts' summed over their expert-DP group and divided by DP (what DeepSpeed applies), then gathered
    over EP into the full [E, ...] tensors."""
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
            dim, parts, _ = shard(p, mesh)
            expert = p.ep_dim is not None
            dist.all_reduce(g, group=mesh.expert_dp_group if expert else mesh.dp_group)
            g /= mesh.dp
            if dim is not None and parts > 1:
                pieces = [torch.empty_like(g) for _ in range(parts)]
                dist.all_gather(pieces, g.contiguous(), group=mesh.ep_group if expert else mesh.tp_group)
                g = torch.cat(pieces, dim=dim)
            assert list(g.shape) == full_shape(p, mesh)
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


def _train(engine, mesh, cfg, steps: torch.Tensor) -> list[tuple[float, float]]:
    """(loss, grad norm) of each step of `steps` [steps, BATCH, seq + 1]."""
    from megatrain.engine.step import train_step

    per = BATCH // mesh.dp
    losses = []
    for batch in steps:
        mine = iter(batch[mesh.dp_rank * per:(mesh.dp_rank + 1) * per].split(cfg.train.micro_batch_size))

        def next_batch(mine=mine) -> dict:
            micro = next(mine)
            return {"input_ids": micro[:, :-1], "labels": micro[:, 1:]}

        loss = float(train_step(engine, next_batch, per // cfg.train.micro_batch_size, torch.device("cpu"),
                                mesh.dp_group)[0])
        losses.append((loss, float(engine.get_global_grad_norm())))
    return losses


def local_experts_and_resume(rank: int, directory: str) -> dict:
    """EP2 x DP2 through DeepSpeed, ZeRO-1, ZeRO-2 and ZeRO-1 in bf16: this rank's expert parameter shapes and
    the fp32 master and Adam moment elements of each optimizer group; with ZeRO-2, the losses of two steps
    after a save, and of the same two steps in a fresh engine that loaded the save (megatrain's checkpointer,
    DeepSpeed's files); in bf16, the (loss, grad norm) of 3 steps with EP2 and with EP1."""
    from pathlib import Path

    from megatrain.config import validate
    from megatrain.engine.build import build_engine, init_distributed, param_groups
    from megatrain.engine.checkpoint import Checkpointer
    from megatrain.parallel import deepspeed_internals as ds

    init_distributed(torch.device("cpu"))
    out: dict = {}
    data = synthetic_batches(3, BATCH, 32, MOE["vocab_size"])
    for zero, precision, ep in ((1, "fp32", 2), (2, "fp32", 2), (1, "bf16", 2), (1, "bf16", 1)):
        cfg = _engine_cfg(ep=ep, zero_stage=zero)
        cfg.train.precision = precision  # ZeRO-1 in bf16 (fp32 gradients): DeepSpeed's BF16_Optimizer
        mesh = Mesh.build(validate(cfg, 4))
        engine = build_engine(cfg, mesh, torch.device("cpu"))
        curve = _train(engine, mesh, cfg, data if precision == "bf16" else data[:1])
        if ep == 1:
            out["bf16_ep1"] = curve
            continue
        masters = ds.master_partitions(engine)
        state = ds.base_optimizer(engine).state
        out[f"zero{zero}_{precision}"] = {
            "expert_shapes": sorted({tuple(p.shape) for p in engine.module.parameters() if p.ep_dim is not None}),
            "group_numel": [sum(p.numel() for p in group["params"]) for group in param_groups(engine.module, 0, 2)],
            "master_numel": [q.numel() for q in masters],
            "moment_numel": [state[q]["exp_avg"].numel() for q in masters],
            "moe_flag": engine.has_moe_layers,
            "curve": curve,
        }
        if zero == 2:  # DeepSpeed's checkpoint, through megatrain's checkpointer
            checkpoints = Checkpointer(Path(directory), keep_last=0, rank=rank)
            saved = checkpoints.save(engine, 1, {"data": {}})
            out["straight"] = _train(engine, mesh, cfg, data[1:])
            engine = build_engine(cfg, mesh, torch.device("cpu"))
            checkpoints.load(engine, saved)
            out["resumed"] = _train(engine, mesh, cfg, data[1:])
    return out


def test_each_rank_keeps_only_its_experts_and_resumes_deepspeeds_checkpoint(tmp_path):
    """EP2 x DP2: a rank holds E / ep = 2 of the 4 experts; ZeRO splits their fp32 masters and Adam moments
    over the expert-DP group of 2 (dense ones over DP = 4); DeepSpeed's checkpoint resumes bit for bit."""
    cfg = ModelConfig(**MOE)
    d, f, e = cfg.d_model, cfg.expert_ffn_dim, cfg.moe.experts
    local_experts = (e // 2) * 3 * f * d  # gate, up, down of 2 experts
    dense = sum(p.numel() for p in Transformer(cfg).parameters()) - e * 3 * f * d
    results = run_ranks(4, local_experts_and_resume, str(tmp_path))
    for result in results:
        for got in (result["zero1_fp32"], result["zero2_fp32"], result["zero1_bf16"]):
            assert got["moe_flag"]
            assert got["expert_shapes"] == sorted([(e // 2, d, f), (e // 2, f, d)])
            decay, keep, experts = got["group_numel"]
            assert experts == local_experts and decay + keep == dense
            # ZeRO pads a group to a multiple of its partition count (times an alignment of 2 elements)
            for numel, master, parts in zip(got["group_numel"], got["master_numel"], (4, 4, 2)):
                assert numel / parts <= master < numel / parts + 2 * parts
            assert got["moment_numel"] == got["master_numel"]
    assert results[0]["resumed"] == results[0]["straight"]
    # BF16_Optimizer clips by a norm that counts each expert once: EP2 as EP1, to bf16's reduction-order noise
    for (loss, norm), (loss1, norm1) in zip(results[0]["zero1_bf16"]["curve"], results[0]["bf16_ep1"]):
        assert loss == pytest.approx(loss1, rel=1e-4) and norm == pytest.approx(norm1, rel=1e-4)
    assert all(r["straight"] == results[0]["straight"] for r in results)
