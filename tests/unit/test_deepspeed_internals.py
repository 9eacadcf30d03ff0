"""Every DeepSpeed internal megatrain touches (parallel/deepspeed_internals.py), checked against the installed
DeepSpeed: when one changes, its test fails with the message naming the DeepSpeed version."""

from __future__ import annotations

import contextlib
import io
import sys

import pytest
import torch

from megatrain.config import Config, Layout
from megatrain.parallel import deepspeed_internals as ds
from tests.distributed.harness import run_ranks
from tests.distributed.workloads import make_config


def _engine(cfg: Config):
    from megatrain.engine.build import build_engine
    from megatrain.parallel.mesh import Mesh

    layout = Layout(zero_stage=cfg.parallel.zero_stage, micro_batch_size=cfg.train.micro_batch_size)
    engine = build_engine(cfg, Mesh.build(layout), torch.device("cpu"))
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len + 1))
    engine.backward(engine(ids[:, :-1], ids[:, 1:]))
    engine.step()
    return engine


def probe_internals(rank: int) -> dict:
    """Use every internal once, in one process (world of 1), and report what each gave."""
    import deepspeed.ops
    from deepspeed.pipe import LayerSpec

    from megatrain.engine.build import init_distributed

    init_distributed(torch.device("cpu"))  # calls skip_shm_comm_op
    out = {"shm_op_disabled": deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False}
    # Stage bounds given for a 3-layer pipeline of one stage: DeepSpeed must keep exactly the first 2.
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    module = ds.staged_pipeline_module()([LayerSpec(torch.nn.Linear, 4, 4) for _ in range(3)], [0, 2],
                                         topology=PipeModelDataParallelTopology(num_pp=1, num_mp=1, num_dp=1))
    out["pipeline_layers_built"] = len(module.forward_funcs)
    # ZeRO-0 in bf16 exists with bf16 gradients only; ZeRO-1 with fp32 ones is DeepSpeed's BF16_Optimizer.
    for zero, precision, grads in ((0, "fp32", "fp32"), (0, "bf16", "bf16"), (1, "bf16", "fp32"),
                                   (1, "bf16", "bf16"), (3, "bf16", "fp32")):
        cfg = make_config(train=dict(precision=precision, grad_reduce_dtype=grads, micro_batch_size=2, seq_len=16),
                          parallel=dict(zero_stage=zero))
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            engine = _engine(cfg)
        params = list(engine.module.parameters())
        masters = ds.master_partitions(engine)
        ds.relink_optimizer_state(engine)
        ds.set_step_counters(engine, 7)
        out[f"zero{zero}_{precision}" + ("_bf16grads" if zero and grads == "bf16" else "")] = {
            "grad_norm": engine.get_global_grad_norm(),
            "base_is_torch": isinstance(ds.base_optimizer(engine), torch.optim.Optimizer),
            "master_numel": sum(q.numel() for q in masters),
            "param_numel": sum(int(torch.Size(ds.unpartitioned_shape(p)).numel()) for p in params),
            "fp32_master": {ds.has_fp32_master(p) for p in params},
            "zero3": {ds.is_zero3_partitioned(p) for p in params},
            "steps": (engine.global_steps, engine.global_samples),
            "memory_reports": printed.getvalue().count("CPU Virtual Memory"),
        }
    # Every engine above imported DeepSpeed's Muon (for an isinstance check): its @torch.compile must not
    # have loaded inductor.
    out["inductor_not_loaded"] = "torch._inductor.compile_fx" not in sys.modules
    return out


@pytest.fixture(scope="module")
def probed() -> dict:
    return run_ranks(1, probe_internals)[0]


def test_the_shared_memory_op_is_off_and_deepspeeds_muon_loads_no_inductor(probed):
    assert probed["shm_op_disabled"] and probed["inductor_not_loaded"]


def test_pipeline_module_builds_the_stage_bounds_it_is_given(probed):
    assert probed["pipeline_layers_built"] == 2


def test_grad_norm_is_recorded_without_zero_and_bf16(probed):
    assert probed["zero0_fp32"]["grad_norm"] is not None and probed["zero0_fp32"]["grad_norm"] > 0


@pytest.mark.parametrize("layout", ["zero0_fp32", "zero0_bf16", "zero1_bf16", "zero1_bf16_bf16grads", "zero3_bf16"])
def test_optimizer_internals_reach_the_master_weights(probed, layout):
    got = probed[layout]
    assert got["base_is_torch"]
    assert got["master_numel"] == got["param_numel"]  # one rank: the partitions hold every parameter
    assert got["fp32_master"] == ({False} if layout.startswith("zero0") else {True})
    assert got["zero3"] == ({True} if layout == "zero3_bf16" else {False})
    assert got["steps"] == (7, 7 * 2)
    assert got["memory_reports"] == 0  # BF16_Optimizer's forced see_memory_usage is off


def test_a_missing_internal_names_the_deepspeed_version():
    import deepspeed

    class NotAnEngine:
        optimizer = object()

    with pytest.raises(ds.InternalChanged, match=f"DeepSpeed {deepspeed.__version__} no longer has "
                                                 "DeepSpeedEngine.clip_fp32_gradients"):
        ds.record_unsharded_grad_norm(NotAnEngine())
    with pytest.raises(ds.InternalChanged, match=f"tested with DeepSpeed {ds.TESTED}"):
        ds.base_optimizer(NotAnEngine())


def test_checkpoint_files_load_weights_only_with_deepspeeds_types_and_nothing_else(tmp_path):
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace(load=torch.load))  # as DeepSpeed's, unsafe
    ds.load_checkpoints_weights_only(engine)
    good = tmp_path / "optim.pt"
    torch.save({"scaler": LossScaler(1.0), "stage": ZeroStageEnum.optimizer_states,
                "address": fragment_address(numel=4, start=0), "t": torch.ones(2)}, good)
    assert engine.checkpoint_engine.load(str(good))["stage"] == ZeroStageEnum.optimizer_states
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"x": Payload()}, tmp_path / "x.pt")
    with pytest.raises(ds.UnsafeCheckpointFile, match="x.pt holds an object other than tensors.*io.open"):
        engine.checkpoint_engine.load(str(tmp_path / "x.pt"))
    assert not marker.exists()


def test_expert_marks_and_groups_are_what_deepspeeds_moe_paths_read():
    """Expert parallelism (engine/build.py) relies on: deepspeed.moe.utils.is_moe_param reading our marks, the
    groups module serving the mesh's groups under DeepSpeed's name (its checkpoint save asks for the largest
    one by name), and the has_moe_layers hook being in place only while deepspeed.initialize runs. That
    DeepSpeed then partitions and reduces the experts over that group is tests/distributed/test_moe_parallel.py."""
    from types import SimpleNamespace

    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import groups

    expert, dense = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    ds.mark_expert_parameters([expert], 2)
    assert is_moe_param(expert) and not is_moe_param(dense)
    assert ds.is_expert_parallel(expert) and not ds.is_expert_parallel(dense)
    mesh = SimpleNamespace(ep=2, ep_group=object(), expert_dp_group=object())
    ds.register_expert_groups(mesh)
    try:
        assert groups._get_max_expert_size_name() == expert.group_name == ds.expert_group_name(2)
        assert groups._get_expert_parallel_group(expert.group_name) is mesh.ep_group
        assert groups._get_expert_data_parallel_group_dict() == {expert.group_name: mesh.expert_dp_group}
    finally:
        ds.register_expert_groups(SimpleNamespace(ep=1, ep_group=None, expert_dp_group=None))
    assert groups._get_expert_parallel_group_dict() == {}
    original = DeepSpeedEngine._configure_distributed_model
    with ds.expert_parallel_engine(True):
        assert DeepSpeedEngine._configure_distributed_model is not original
    assert DeepSpeedEngine._configure_distributed_model is original
    with ds.expert_parallel_engine(False):
        assert DeepSpeedEngine._configure_distributed_model is original
