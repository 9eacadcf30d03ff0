"""The planner: parameter placement, model-state bytes, activations as autograd keeps them, search, CLI."""

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir

from launcher.common import CONF_DIR
from megatrain.config import Config, ConfigError, Layout, ModelConfig, register_configs, to_config
from megatrain.model.init import init_parameter
from megatrain.model.transformer import Transformer
from megatrain.parallel.mesh import Mesh
from megatrain.plan import (
    GB,
    head_activation_bytes,
    layer_activation_bytes,
    plan,
    search,
    stage_params,
)
from megatrain.scaling.flops import param_counts

LLAMA = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
GPT2 = replace(LLAMA, norm="layernorm", position="learned", activation="gelu", bias=True, tie_embeddings=True)


def preset(name: str, *overrides: str) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return to_config(compose("config", overrides=[f"model={name}", *overrides]))


def _config(model: ModelConfig, **sections) -> Config:
    cfg = Config(model=model)
    for section, values in sections.items():
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **values)})
    return cfg


@pytest.mark.parametrize("model", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parameters_per_tp_rank_are_those_the_model_builds(model, tp):
    built = Transformer(model, Mesh(Layout(tp=tp)))  # shapes only: no collective runs at construction
    assert stage_params(_config(model, parallel=dict(tp=tp))) == [sum(p.numel() for p in built.parameters())]


def test_pipeline_stages_split_blocks_and_put_embedding_first_and_head_last():
    cfg = preset("llama-7b", "parallel.pp=4")
    per_stage = stage_params(cfg)
    counts = param_counts(cfg.model)
    assert sum(per_stage) == counts.total
    block = (counts.non_embedding - cfg.model.d_model) // cfg.model.n_layers
    assert per_stage[1] == per_stage[2] == 8 * block
    assert per_stage[0] - per_stage[1] == cfg.model.vocab_size * cfg.model.d_model


@pytest.mark.parametrize(("precision", "grads", "zero", "dp", "bytes_per_param"), [
    ("bf16", "bf16", 0, 4, 16),  # ZeRO paper: 2 + 2 + 12 bytes per parameter
    ("bf16", "bf16", 1, 4, 2 + (2 + 12) / 4),  # DeepSpeed keeps only the averaged gradient partition
    ("bf16", "bf16", 2, 4, 2 + (2 + 12) / 4),
    ("bf16", "bf16", 3, 4, 16 / 4),
    ("bf16", "fp32", 1, 4, 2 + 2 + 4 + 12 / 4),  # BF16_Optimizer: bf16 grads and a full fp32 copy
    ("bf16", "fp32", 2, 4, 2 + (4 + 12) / 4),  # fp32 gradient partitions
    ("bf16", "fp32", 3, 4, (2 + 4 + 12) / 4),
    ("fp32", "fp32", 0, 4, 16),  # plain AdamW: weights, grads, m, v
    ("fp32", "fp32", 1, 4, 4 + (4 + 4 + 8) / 4),  # DeepSpeed's ZeRO keeps an fp32 master copy anyway
    ("fp32", "fp32", 3, 2, 20 / 2),
])
def test_model_state_bytes_follow_zero_stage_and_precision(precision, grads, zero, dp, bytes_per_param):
    cfg = preset("llama-7b", f"parallel.zero_stage={zero}", f"train.precision={precision}",
                 f"train.grad_reduce_dtype={grads}", f"plan.num_gpus={dp}")
    p = plan(cfg)
    assert p.memory.model_states == pytest.approx(bytes_per_param * p.params.total)


@pytest.mark.parametrize("seq", [128, 8192])  # the peak after backward (short sequences), or in it (long)
def test_bf16_optimizer_gradients_and_buffers_that_follow_backward_are_not_added_to_the_activations(seq):
    cfg = preset("llama-1b", "parallel.zero_stage=1", "train.precision=bf16", "train.grad_reduce_dtype=fp32",
                 "plan.num_gpus=4", f"train.seq_len={seq}", "train.micro_batch_size=1")
    mem = plan(cfg).memory
    params = plan(cfg).params_per_rank
    assert mem.after_backward == 2 * params + mem.comm_buffers  # the bf16 .grads and the flat all-reduce buffers
    after = mem.model_states + mem.comm_buffers
    assert mem.total - mem.overhead == max(after, after + mem.activations - mem.after_backward)
    assert (mem.total - mem.overhead == after) == (mem.activations < mem.after_backward)
    accumulating = plan(preset("llama-1b", "parallel.zero_stage=1", "train.precision=bf16", "plan.num_gpus=4",
                               "train.micro_batch_size=1", "train.global_batch_size=8")).memory
    assert accumulating.after_backward == accumulating.comm_buffers  # earlier micro-batches' .grads are held
    other = plan(preset("llama-1b", "parallel.zero_stage=2", "train.precision=bf16", "plan.num_gpus=4")).memory
    assert other.after_backward == 0
    assert other.total == other.model_states + other.activations + other.comm_buffers + other.overhead


def _saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids[:, :-1], ids[:, 1:])
    return sum(saved.values())


@pytest.mark.parametrize("model", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_activation_bytes_are_what_autograd_keeps(model, precision, checkpointing):
    torch.manual_seed(0)
    built = Transformer(model, Mesh.single(), checkpointing=checkpointing)
    for name, p in built.named_parameters():
        init_parameter(p, name, 0, Mesh.single())
    if precision == "bf16":
        built = built.bfloat16()
    micro, seq = 2, 64
    measured = _saved_activation_bytes(built, torch.randint(0, model.vocab_size, (micro, seq + 1)))
    if checkpointing == "full":
        per_layer = (2 if precision == "bf16" else 4) * model.d_model  # the block input only
    else:
        per_layer = layer_activation_bytes(model, 1, False, precision, checkpointing)
    planned = (micro * seq * model.n_layers * per_layer
               + head_activation_bytes(model, 1, False, precision, micro * seq)[0])
    assert planned == pytest.approx(measured, rel=0.05)


def test_sequence_parallel_and_checkpointing_shrink_activations():
    act = {}
    for name, extra in {"tp": [], "sp": ["parallel.sequence_parallel=true"],
                        "full": ["train.activation_checkpointing=full"]}.items():
        act[name] = plan(preset("llama-7b", "parallel.tp=4", "plan.num_gpus=4", "train.seq_len=4096",
                                "train.micro_batch_size=1", *extra)).memory.activations
    assert act["sp"] < act["tp"] and act["full"] < act["sp"]


def test_7b_does_not_fit_one_80gb_gpu_without_sharding_but_fits_eight_with_zero3():
    single = plan(preset("llama-7b", "train.seq_len=4096", "train.micro_batch_size=1"))
    # ZeRO-1 on one GPU, fp32 gradients: bf16 weights and grads, their fp32 copy, fp32 master + Adam
    assert single.memory.model_states / GB == pytest.approx((2 + 2 + 4 + 12) * 6.738e9 / GB, rel=1e-3)
    assert not single.fits
    sharded = plan(preset("llama-7b", "train.seq_len=4096", "train.micro_batch_size=1", "plan.num_gpus=8",
                          "parallel.zero_stage=3", "train.activation_checkpointing=full"))
    assert sharded.fits


def test_pipeline_bubble_and_lower_mfu_lengthen_the_step():
    # seq 4096: compute dominates the ZeRO-1 parameter all-gather after the step, which nothing hides
    base = ("plan.num_gpus=8", "train.global_batch_size=64", "train.micro_batch_size=1", "train.seq_len=4096")
    flat = plan(preset("llama-7b", *base))
    piped = plan(preset("llama-7b", *base, "parallel.pp=8"))
    slow = plan(preset("llama-7b", *base, "plan.mfu=0.2"))
    assert piped.step_time_s > flat.step_time_s
    assert slow.step_time_s == pytest.approx(2 * flat.step_time_s, rel=0.05)


def test_the_step_time_counts_the_dp_traffic_backward_cannot_hide():
    """ZeRO-0 (and ZeRO-1 under DeepSpeed's BF16_Optimizer) waits for its whole all-reduce, ZeRO-1/2 for the
    parameter all-gather after the step plus the last bucket, ZeRO-3 for what compute cannot hide."""
    base = ("plan.gpus_per_node=8", "train.micro_batch_size=1", "train.seq_len=4096", "train.grad_reduce_dtype=bf16")
    compute = plan(preset("llama-7b", *base, "plan.num_gpus=1", "train.global_batch_size=4")).step_time_s

    def exposed(*keys: str) -> float:  # DP 64 over nodes, the same 4 micro-batches per GPU as the DP 1 plan
        return plan(preset("llama-7b", *base, "plan.num_gpus=64", "train.global_batch_size=256", *keys)
                    ).step_time_s - compute

    ring, bw, bucket = 63 / 64, 50e9, 4096 ** 2
    grad = ring * 2 * 6.738e9 / bw  # bf16 over the inter-node links
    last = ring * 2 * bucket / bw
    assert exposed("parallel.zero_stage=0") == pytest.approx(2 * grad, rel=0.02)
    assert exposed("parallel.zero_stage=1") == pytest.approx(grad + last, rel=0.02)
    assert exposed("parallel.zero_stage=1", "train.grad_reduce_dtype=fp32") == pytest.approx(5 * grad, rel=0.02)
    assert exposed("parallel.zero_stage=2") == pytest.approx(max(4 * grad - 2 / 3 * compute, last) + grad, rel=0.02)
    assert exposed("parallel.zero_stage=3") == pytest.approx(max(3 * 4 * grad - compute, last), rel=0.02)
    # zero3_gather=model: the forward's gathers serve the backward, one gather per micro-batch
    assert exposed("parallel.zero_stage=3", "parallel.zero3_gather=model") == pytest.approx(
        max(2 * 4 * grad - compute, last), rel=0.02)


def test_search_ranks_only_fitting_layouts_best_throughput_first():
    cfg = preset("llama-13b", "train.seq_len=4096", "train.global_batch_size=64", "plan.gpu_memory_gb=40")
    plans = search(cfg, 8)
    assert plans, "a 13B model fits on 8 x 40 GB with sharding"
    assert all(p.fits and p.world == 8 for p in plans)
    rates = [p.tokens_per_s for p in plans]
    assert rates == sorted(rates, reverse=True)
    assert {p.layout.zero_stage for p in plans} != {0}  # unsharded 13B states (208 GB) cannot fit
    assert search(preset("llama-70b", "train.seq_len=4096"), 1) == []
    # zero3_gather=model applies to the ZeRO-3 candidates and does not filter out the others
    held = search(preset("llama-13b", "train.seq_len=4096", "train.global_batch_size=64", "plan.gpu_memory_gb=40",
                         "parallel.zero3_gather=model"), 8)
    assert {p.layout.zero_stage for p in held} == {p.layout.zero_stage for p in plans}


def _cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.plan", *overrides], capture_output=True, text=True)


def test_cli_prints_the_breakdown_and_the_verdict():
    out = _cli("model=llama-7b", "plan.num_gpus=8", "parallel.zero_stage=3", "train.seq_len=4096",
               "train.micro_batch_size=1")
    assert out.returncode == 0, out.stderr
    for word in ("6,738,415,616 parameters", "non-embedding", "FLOPs per token", "weights", "gradients",
                 "optimizer states", "activations", "comm buffers", "overhead", "tokens/s", "fits"):
        assert word in out.stdout


def test_cli_explains_an_impossible_layout():
    out = _cli("model=llama-7b", "parallel.pp=2", "parallel.zero_stage=3")
    assert out.returncode != 0
    assert "parallel.zero_stage=3 with parallel.pp=2" in out.stderr


def test_a_null_vocabulary_is_sized_from_the_data_as_training_sizes_it(tmp_path):
    from megatrain.config import padded_vocab_size
    from tests.unit.data_calls import run_prepare

    assert [padded_vocab_size(v, 128, tp) for v, tp in ((50257, 1), (50257, 2), (512, 1), (300, 4))] == [
        50304, 50432, 512, 512]
    prep = Config()
    (tmp_path / "a.txt").write_text("one two three four five six seven eight nine ten " * 100)
    prep.prepare.input, prep.prepare.output = str(tmp_path / "a.txt"), str(tmp_path / "data")
    prep.tokenizer.vocab_size, prep.logging.progress = 280, False
    run_prepare(prep)
    planned = plan(preset("tiny", f"data.path={tmp_path / 'data'}", "parallel.tp=2", "plan.num_gpus=2"))
    assert planned.params.total == param_counts(replace(preset("tiny").model, vocab_size=512)).total  # 280 -> 2 x 256
    with pytest.raises(ConfigError, match="model.vocab_size is null .* give model.vocab_size=<n> to plan without"):
        plan(preset("tiny", f"data.path={tmp_path / 'none'}"))


def test_pipeline_memory_is_planned_for_the_first_and_the_last_stage():
    cfg = preset("llama-1b", "parallel.pp=4", "model.tie_embeddings=false", "train.micro_batch_size=1",
                 "train.global_batch_size=8", "train.seq_len=4096", "parallel.zero_stage=1")
    p = plan(cfg)
    first, last = p.first_last_memory
    assert p.stage_blocks == (5, 5, 5, 1)  # the head's FLOPs weigh one stage's worth of blocks
    layer = layer_activation_bytes(cfg.model, 1, False, "bf16", "none")
    assert first.activations == pytest.approx(4096 * 5 * 4 * layer)  # 1F1B: 4 micro batches in flight
    head = sum(head_activation_bytes(cfg.model, 1, False, "bf16", 4096, whole_logits=True, grad_accum=8))
    assert last.activations == pytest.approx(4096 * layer + head)  # one in flight, with the head and loss
    # with accumulation, two micro-batches' bf16 logits (tracked tensor lifetimes, test_plan_matches_run)
    one = sum(head_activation_bytes(cfg.model, 1, False, "bf16", 4096, whole_logits=True))
    assert head - one == 2 * 4096 * cfg.model.vocab_size
    assert first.weights / last.weights == pytest.approx(p.stage_params[0] / p.stage_params[-1])
    assert p.memory == max(first, last, key=lambda m: m.total)
