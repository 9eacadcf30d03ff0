"""The MoE block: dispatch against a per-token reference loop, routing, balancing, config checks."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatrain.config import Config, ConfigError, Layout, ModelConfig, MoEConfig, validate
from megatrain.model.init import init_parameter
from megatrain.model.moe import after_step, load_stats, moe_layers
from megatrain.model.transformer import Transformer
from megatrain.parallel.mesh import Mesh

MOE = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=64,
                  moe=MoEConfig(experts=4, top_k=2, shared_experts=1, expert_ffn_hidden=16, z_loss_coef=1e-3))


def _model(cfg: ModelConfig = MOE, seed: int = 3) -> Transformer:
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        init_parameter(p, name, seed, Mesh.single())
    return model


def _reference(layer, x: torch.Tensor) -> torch.Tensor:
    """Each token through its top-k experts one by one, weighted; plus the shared experts."""
    tokens = x.reshape(-1, x.shape[-1])
    _, _, chosen, weights = layer.route(tokens)
    ex = layer.experts
    rows = []
    for t in range(tokens.shape[0]):
        y = torch.zeros_like(tokens[t])
        for k in range(chosen.shape[1]):
            e = chosen[t, k]
            h = F.silu(ex.gate[e] @ tokens[t]) * (ex.up[e] @ tokens[t])
            y = y + weights[t, k] * (ex.down[e] @ h)
        rows.append(y)
    return torch.stack(rows).view_as(x) + layer.shared(x)


@pytest.mark.parametrize("skew", [False, True], ids=["random", "all-to-expert-2"])
def test_dispatch_matches_a_per_token_loop_in_values_and_gradients(skew):
    layer = moe_layers(_model())[0]
    if skew:  # the selection bias sends every token to expert 2 (plus one other): maximally unbalanced
        layer.expert_bias[2] = 10.0
    x = torch.randn(3, 10, MOE.d_model, requires_grad=True)
    out = layer(x, [])
    if skew:
        assert layer.load[2] == 30 and layer.load.sum() == 60  # every copy computed: none dropped
    ref = _reference(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    params = [x, layer.router, layer.experts.gate, layer.experts.up, layer.experts.down]
    got = torch.autograd.grad(out.square().sum(), params)
    want = torch.autograd.grad(ref.square().sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_routing_is_deterministic_for_a_seed_and_the_balance_loss_is_in_the_training_loss():
    batch = torch.randint(0, MOE.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for seed in (3, 3, 4):
        model = _model(seed=seed)
        losses.append(model(batch[:, :-1], batch[:, 1:]))
        losses[-1].backward()
        after_step(model)
        losses[-1] = (losses[-1].item(), load_stats(model).tolist())
    assert losses[0] == losses[1] and losses[0] != losses[2]
    plain = _model(dataclasses.replace(MOE, moe=dataclasses.replace(MOE.moe, aux_loss_coef=0.0, z_loss_coef=0.0)))
    assert plain(batch[:, :-1], batch[:, 1:]).item() < losses[0][0]  # the router losses are added
    plain.eval()  # and evaluation reports the language-model loss only
    reference = _model().eval()(batch[:, :-1], batch[:, 1:]).item()
    assert plain(batch[:, :-1], batch[:, 1:]).item() == pytest.approx(reference)


def test_load_statistics_and_the_selection_bias_update():
    cfg = dataclasses.replace(MOE, moe=dataclasses.replace(MOE.moe, bias_update_rate=0.01))
    model = _model(cfg)
    layer = moe_layers(model)[0]
    layer.expert_bias[1] = 10.0  # expert 1 takes every token
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1], ids[:, 1:]).backward()
    before = layer.expert_bias.clone()
    after_step(model)
    load = layer.last_load
    low, high, cv = load_stats(model)[0].tolist()
    assert (low, high) == (load.min(), load.max()) == (load.min(), 18)  # 18 tokens, one copy each on expert 1
    assert cv == pytest.approx((load.std(correction=0) / load.mean()).item()) and cv > 0.5
    assert layer.load.sum() == 0  # the next step counts afresh
    # Overloaded experts' bias goes down, underloaded ones' up
    torch.testing.assert_close(layer.expert_bias - before, 0.01 * torch.sign(load.mean() - load))


def _config(**keys) -> Config:
    cfg = Config(model=dataclasses.replace(MOE))
    cfg.train.seq_len = 32
    for key, value in keys.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize("keys, world, message", [
    (dict(parallel__ep=2, model__moe=MoEConfig()), 2, "needs a mixture-of-experts model"),
    (dict(parallel__ep=3), 3, "must divide model.moe.experts=4"),
    (dict(parallel__ep=2), 3, "must divide the data-parallel size 3"),
    (dict(parallel__pp=2), 2, "pipeline stages"),
    (dict(parallel__zero_stage=3), 2, "parallel.zero_stage=3 with model.moe.experts=4"),
    (dict(parallel__ep=2, parallel__zero_stage=0), 2, "parallel.ep=2 with parallel.zero_stage=0"),
    (dict(parallel__cp=2), 2, "parallel.cp=2 with model.moe.experts=4"),
    (dict(parallel__tp=2, parallel__sequence_parallel=True), 2, "whole sequences"),
    (dict(model__moe=MoEConfig(experts=4, top_k=5)), 1, "model.moe.top_k=5"),
    (dict(model__moe=MoEConfig(experts=4, router="relu")), 1, "model.moe.router='relu'"),
    (dict(model__moe=MoEConfig(experts=4, first_dense_layers=2)), 1, "model.moe.first_dense_layers=2"),
])
def test_config_refuses_what_moe_does_not_compose_with(keys, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate(_config(**keys), world)


def test_expert_parallel_layout_is_accepted():
    assert validate(_config(parallel__ep=2, parallel__tp=2), 8).ep == 2


def test_parameter_counts_planner_and_active_flops_match_the_model():
    from megatrain.config import ParallelConfig
    from megatrain.plan import stage_params
    from megatrain.scaling.flops import matmul_params, param_counts

    cfg = dataclasses.replace(MOE, moe=dataclasses.replace(MOE.moe, first_dense_layers=1))
    model = _model(cfg)
    counts = param_counts(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    dense_mlp, expert = 3 * 32 * 64, 3 * 32 * 16
    assert counts.total - counts.active_total == (4 - 2) * expert  # a token uses 2 of the 4 routed experts
    assert matmul_params(cfg) == counts.active_non_embedding + 256 * 32
    assert param_counts(dataclasses.replace(cfg, moe=MoEConfig())).total == counts.total - (
        4 * expert + 4 * 32 + expert - dense_mlp)  # routed experts + router + shared expert replace the MLP
    for tp, ep in ((1, 1), (2, 1), (1, 2), (2, 2)):  # a rank of each layout, EP carved out of DP = 2
        rank_model = Transformer(cfg, Mesh(Layout(tp=tp, dp=ep, ep=ep)))
        assert stage_params(Config(model=cfg, parallel=ParallelConfig(tp=tp, ep=ep))) == [
            sum(p.numel() for p in rank_model.parameters())]


@pytest.mark.parametrize("zero, precision", [(1, "fp32"), (2, "fp32"), (1, "bf16")])
def test_planner_counts_one_ep_ranks_experts_partitioned_over_expert_dp(zero, precision):
    """Routed experts on a rank: E / ep of them, their ZeRO states split over the DP / ep expert-DP ranks."""
    from megatrain.plan import plan
    from tests.unit.test_plan import preset

    def memory(ep: int):
        cfg = preset("tiny-moe", "model.vocab_size=256", f"parallel.ep={ep}", f"parallel.zero_stage={zero}",
                     "plan.num_gpus=4", f"train.precision={precision}", "train.micro_batch_size=1",
                     "train.global_batch_size=4")
        return cfg, plan(cfg).memory

    cfg, one = memory(1)
    _, two = memory(2)
    model = cfg.model
    routed = sum(model.is_moe_layer(i) for i in range(model.n_layers)) * model.moe.experts * 3 * (
        model.expert_ffn_dim * model.d_model)
    width = 2 if precision == "bf16" else 4
    assert one.weights - two.weights == width * routed / 2  # half the experts' weights
    # the optimizer's share of them stays 1/4: E / 2 experts partitioned over 2 expert-DP ranks, not E over 4
    assert one.optimizer == two.optimizer
    # unpartitioned gradients halve (BF16_Optimizer's bf16 and fp32 copies: 6 bytes); partitioned ones stay 1/4
    assert one.gradients - two.gradients == (6 * routed / 2 if precision == "bf16" else 0)


@pytest.mark.parametrize("shared", [1, 0])
def test_export_to_qwen2_moe_gives_the_same_logits(shared):
    from transformers import Qwen2MoeForCausalLM

    from megatrain.export.hf import hf_config, to_hf

    cfg = dataclasses.replace(MOE, n_layers=3, n_kv_heads=2, moe=dataclasses.replace(
        MOE.moe, shared_experts=shared, first_dense_layers=1))
    model = _model(cfg).eval()
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.normal_(0, 1.0)  # decisive routing: a token's experts differ from layer to layer
    weights = {name: p.detach() for name, p in model.named_parameters()}
    hf = Qwen2MoeForCausalLM(hf_config(cfg)).eval()
    hf.load_state_dict(to_hf(cfg, weights), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-5)


def test_export_refuses_what_qwen2_moe_cannot_represent():
    from megatrain.export.hf import architecture

    with pytest.raises(ValueError, match="model.moe.router=sigmoid"):
        architecture(dataclasses.replace(MOE, moe=dataclasses.replace(MOE.moe, router="sigmoid")))


def test_sweep_sizes_moe_points_by_active_parameters_and_fits_read_them(tmp_path):
    import json

    from megatrain.scaling.collect import read_run_dir
    from megatrain.scaling.flops import param_counts
    from megatrain.scaling.sweep import model_shapes

    cfg = Config(model=dataclasses.replace(MOE, moe=dataclasses.replace(MOE.moe, experts=16, top_k=1)))
    cfg.sweep.min_params, cfg.sweep.max_params, cfg.sweep.sizes = 2e5, 2e6, 3
    by_total = model_shapes(cfg)
    cfg.fit.params = "active_non_embedding"
    by_active = model_shapes(cfg)
    # the same active size takes a bigger shape than the same total size
    assert [m.d_model for m in by_active] > [m.d_model for m in by_total]
    assert all(2e5 / 3 < param_counts(m).active_non_embedding < 2e6 * 3 for m in by_active)
    (tmp_path / "summary.json").write_text(json.dumps({
        "params_total": 9e6, "params_non_embedding": 8e6, "params_active": 3e6, "params_active_non_embedding": 2e6,
        "tokens": 1e8, "final_eval_loss": 3.0}))
    assert read_run_dir(tmp_path, "active_non_embedding").params == 2e6
    assert read_run_dir(tmp_path, "active_total").params == 3e6
