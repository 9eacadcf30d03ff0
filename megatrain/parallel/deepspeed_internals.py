"""Every use of a DeepSpeed internal (a private name, or an attribute its docs do not promise), in one place.

megatrain is tested with DeepSpeed TESTED (pyproject allows that minor version only). Each function
checks that the internal it relies on is still there and, if it is not, raises `InternalChanged`
naming the installed DeepSpeed version, rather than training on silently wrong state;
tests/unit/test_deepspeed_internals.py exercises every one against the installed DeepSpeed.
DeepSpeed is imported inside the functions: its accelerator must be chosen before the first import.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from collections.abc import Iterator
from typing import Any

import torch

TESTED = "0.19"
MASTER_PARTITIONS = ("fp32_partitioned_groups_flat",  # ZeRO-3
                     "single_partition_of_fp32_groups",  # ZeRO-1/2
                     "fp32_groups_flat_partition")  # DeepSpeed's BF16_Optimizer


class InternalChanged(RuntimeError):
    """The installed DeepSpeed lacks an internal megatrain relies on."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        import deepspeed

        raise InternalChanged(f"DeepSpeed {deepspeed.__version__} no longer has {what}, which megatrain relies on; "
                              f"megatrain is tested with DeepSpeed {TESTED}.x: install deepspeed=={TESTED}.*")


def skip_shm_comm_op() -> None:
    """deepspeed.init_distributed compiles a shared-memory op (~40 s on a fresh machine) training never uses."""
    import deepspeed.ops

    ops = deepspeed.ops.__compatible_ops__
    _require(isinstance(ops, dict) and "deepspeed_shm_comm" in ops,
             "deepspeed.ops.__compatible_ops__['deepspeed_shm_comm']")
    ops["deepspeed_shm_comm"] = False


MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_muon_uncompiled() -> None:
    """DeepSpeed's optimizer wrappers import its Muon to ask `isinstance(optimizer, MuonWithAuxAdam)`, and
    that import applies @torch.compile, which loads inductor (~1.5 s of every rank's start-up). megatrain
    never builds a Muon optimizer, so import it once with the decorator as the identity."""
    if MUON in sys.modules:
        return
    from deepspeed.runtime import compiler

    _require(callable(getattr(compiler, "compile", None)), "deepspeed.runtime.compiler.compile")
    decorator = compiler.compile
    compiler.compile = lambda: (lambda fn: fn)
    try:
        importlib.import_module(MUON)
    finally:
        compiler.compile = decorator


def quiet_bf16_optimizer() -> None:
    """DeepSpeed's BF16_Optimizer forces four memory reports at its start (print "MA 0.36 GB ... CPU Virtual
    Memory", each after a gc.collect: 0.62 s of rank 0's start measured, and noise in the user's log): turn them off."""
    from deepspeed.runtime import bf16_optimizer

    _require(callable(getattr(bf16_optimizer, "see_memory_usage", None)),
             "deepspeed.runtime.bf16_optimizer.see_memory_usage")
    bf16_optimizer.see_memory_usage = lambda message, force=False: None


def record_unsharded_grad_norm(engine: Any) -> None:
    """Without ZeRO or bf16 DeepSpeed computes the norm it clips by, then drops it: keep it, so
    engine.get_global_grad_norm() reports it as it does for every other layout."""
    from deepspeed.runtime.utils import clip_grad_norm_

    _require(callable(getattr(engine, "clip_fp32_gradients", None)) and hasattr(engine, "_global_grad_norm"),
             "DeepSpeedEngine.clip_fp32_gradients / _global_grad_norm")

    def clip_and_record() -> None:
        engine._global_grad_norm = clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(),
                                                   mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_record


@functools.cache
def staged_pipeline_module() -> type:
    """A DeepSpeed PipelineModule whose stage boundaries are given (`stage_starts`), not computed by it.

    DeepSpeed calls `_partition_layers` from inside PipelineModule.__init__ and offers no hook for
    explicit boundaries, so the override sets them; they are stored with object.__setattr__
    because nn.Module's attribute machinery does not exist yet at that point.
    """
    from deepspeed.pipe import PipelineModule

    _require(all(hasattr(PipelineModule, name) for name in ("_partition_layers", "_set_bounds")),
             "PipelineModule._partition_layers / _set_bounds")

    class StagedPipelineModule(PipelineModule):
        def __init__(self, layers: list, stage_starts: list[int], **kwargs: Any):
            object.__setattr__(self, "_stage_starts", list(stage_starts))
            super().__init__(layers, partition_method="given", **kwargs)

        def _partition_layers(self, method: str = "given") -> None:
            self.parts = self._stage_starts
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    return StagedPipelineModule


def unpartitioned_shape(p: torch.Tensor) -> torch.Size:
    """The shape of a parameter before ZeRO-3 partitioned it (its own shape otherwise)."""
    if is_zero3_partitioned(p):
        _require(hasattr(p, "ds_shape"), "the ds_shape of ZeRO-3 parameters")
        return p.ds_shape
    return p.shape


def is_zero3_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed drives: ZeRO and the bf16 optimizer wrap it in `.optimizer`."""
    wrapper = engine.optimizer
    if isinstance(wrapper, torch.optim.Optimizer) and not hasattr(wrapper, "optimizer"):
        return wrapper  # ZeRO-0 in fp32: the torch optimizer itself
    _require(isinstance(getattr(wrapper, "optimizer", None), torch.optim.Optimizer),
             f"{type(wrapper).__name__}.optimizer (the wrapped torch optimizer)")
    return wrapper.optimizer


def has_fp32_master(p: torch.Tensor) -> bool:
    """Whether DeepSpeed links `p` to an fp32 master copy (ZeRO-1/2/3, BF16_Optimizer) that
    deepspeed.utils.safe_get/set_full_* reach; if not, the torch optimizer's own state is keyed by `p`."""
    return is_zero3_partitioned(p) or hasattr(p, "_hp_mapping")


def unlinked_master(engine: Any, p: torch.Tensor) -> torch.Tensor:
    """The tensor the torch optimizer updates for a `p` without a linked fp32 master (not has_fp32_master):
    ZeRO-0 in bf16 with bf16 gradients (FP16_UnfusedOptimizer) keeps fp32 copies in `fp32_groups`, aligned
    with `fp16_groups`; ZeRO-0 in fp32 updates `p` itself."""
    wrapper = engine.optimizer
    if not hasattr(wrapper, "fp16_groups"):
        return p
    _require(hasattr(wrapper, "fp32_groups"), f"{type(wrapper).__name__}.fp32_groups (the fp32 masters)")
    for low, high in zip(wrapper.fp16_groups, wrapper.fp32_groups):
        for candidate, master in zip(low, high):
            if candidate is p:
                return master
    _require(False, f"{type(wrapper).__name__}.fp16_groups holding every trained parameter")
    return p


def master_partitions(engine: Any) -> list[torch.Tensor]:
    """The fp32 tensors the torch optimizer keeps Adam state for.

    ZeRO-3 puts its flat partitions into the optimizer's param groups only while it steps, so they
    are read from the ZeRO optimizer; otherwise the optimizer's own param groups hold them (ZeRO-1/2
    partitions, the fp32 copies of DeepSpeed's bf16 wrapper, or the parameters themselves).
    """
    for attr in MASTER_PARTITIONS:
        if hasattr(engine.optimizer, attr):
            return list(getattr(engine.optimizer, attr))
    _require(type(engine.optimizer).__name__ != "DeepSpeedZeroOptimizer_Stage3",
             "DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat")
    return [q for group in base_optimizer(engine).param_groups for q in group["params"]]


def relink_optimizer_state(engine: Any) -> None:
    """Point every parameter of ZeRO-1/2 and the bf16 optimizer at its slice of the flat Adam state.

    DeepSpeed links them once, right after the first parameter group's first step, so the other
    groups (here: norms and biases) stay unlinked and their moments unreachable through
    safe_get_full_optimizer_state; linking again once every group has state fixes that.
    """
    optimizer = engine.optimizer
    if not any(hasattr(optimizer, attr) for attr in MASTER_PARTITIONS[1:]):
        return  # ZeRO-3 and plain torch optimizers need no link
    _require(callable(getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None))
             and hasattr(optimizer, "_hp_optimizer_states_linked"),
             f"{type(optimizer).__name__}._lazy_init_hp_params_optimizer_state / _hp_optimizer_states_linked")
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()


def set_step_counters(engine: Any, step: int) -> None:
    """The engine's own step and sample counters, as if it had trained `step` steps (a layout change)."""
    _require(hasattr(engine, "global_steps") and hasattr(engine, "global_samples"),
             "DeepSpeedEngine.global_steps / global_samples")
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()


# The only classes DeepSpeed 0.19 pickles into its checkpoint files (besides tensors and plain data), found
# with torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO 0-3, bf16 and pipeline checkpoints.
CHECKPOINT_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.runtime.zero.config.ZeroStageEnum",
                      "deepspeed.utils.tensor_fragment.fragment_address")


class UnsafeCheckpointFile(RuntimeError):
    """A checkpoint file holds an object a weights-only load refuses (a pickle that could run code)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path} holds an object other than tensors, plain data and DeepSpeed's "
                         f"{len(CHECKPOINT_GLOBALS)} allow-listed types ({reason}); refusing to load it: "
                         "unpickling it could run code")
        self.path = path


def _checkpoint_globals() -> list[type]:
    import importlib

    found = []
    for name in CHECKPOINT_GLOBALS:
        module, _, attr = name.rpartition(".")
        cls = getattr(importlib.import_module(module), attr, None)
        _require(cls is not None, name)
        found.append(cls)
    return found


def load_weights_only(path: str, map_location: Any = None) -> Any:
    """torch.load that never runs code: tensors, plain data and DeepSpeed's allow-listed types only."""
    import pickle
    import re

    with torch.serialization.safe_globals(_checkpoint_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            reason = f"it asks for {found[1]}" if found else str(err).strip().splitlines()[-1]
            raise UnsafeCheckpointFile(str(path), reason) from err


def load_checkpoints_weights_only(engine: Any) -> None:
    """DeepSpeed 0.19's TorchCheckpointEngine.load passes weights_only=False, so a planted pickle in any of
    its files runs as the training user; every file of engine.load_checkpoint goes through it."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    _require(callable(getattr(checkpoint_engine, "load", None)), "DeepSpeedEngine.checkpoint_engine.load")
    checkpoint_engine.load = load_weights_only


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name of the expert groups of size ep (its groups module parses the size out of it)."""
    return f"ep_size_{ep}"


def register_expert_groups(mesh: Any) -> None:
    """Hand DeepSpeed the mesh's EP and expert-DP groups (no expert parallelism: none) and mark the routed
    experts (parameters with `ep_dim`) as DeepSpeed MoE parameters of that group.

    DeepSpeed's ZeRO-1/2 and BF16 optimizers partition an 'moe' parameter group over, and reduce its
    gradients over, `groups._EXPERT_DATA_PARALLEL_GROUP[name]`; its engine broadcasts such parameters over
    that group only and skips them in the dense gradient all-reduce (`p.allreduce = False`). DeepSpeed
    fills these dicts only for its own deepspeed.moe layers, from its own rank arithmetic; here the mesh
    owns the groups, so they are set to the mesh's (replaced, not merged: one engine per process at a time).
    """
    from deepspeed.utils import groups

    _require(all(hasattr(groups, name) for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP",
                                                     "_get_expert_data_parallel_group_dict")),
             "deepspeed.utils.groups._EXPERT_PARALLEL_GROUP / _EXPERT_DATA_PARALLEL_GROUP")
    on = mesh.ep > 1
    name = expert_group_name(mesh.ep)
    groups._EXPERT_PARALLEL_GROUP = {name: mesh.ep_group} if on else {}
    groups._EXPERT_DATA_PARALLEL_GROUP = {name: mesh.expert_dp_group} if on else {}


def mark_expert_parameters(params: list[torch.nn.Parameter], ep: int) -> None:
    """DeepSpeed's MoE parameter marks (deepspeed.moe.utils.is_moe_param): excluded from the dense DP
    reduction, reduced over the expert-DP group named `group_name`."""
    for p in params:
        p.allreduce = False
        p.group_name = expert_group_name(ep)


def is_expert_parallel(p: torch.Tensor) -> bool:
    """Whether `p` is a routed expert DeepSpeed partitions over the expert-DP group (mark_expert_parameters)."""
    return getattr(p, "allreduce", True) is False and hasattr(p, "group_name")


@contextlib.contextmanager
def expert_parallel_engine(enabled: bool) -> Iterator[None]:
    """While deepspeed.initialize runs: make the engine take its MoE paths (has_moe_layers).

    DeepSpeed sets has_moe_layers in DeepSpeedEngine._configure_distributed_model only when it finds its own
    deepspeed.moe.layer.MoE modules, and the optimizer wrappers it builds next read the flag (ZeRO-1/2 and
    BF16: per-group expert-DP partitions; ZeRO-2: reduce-scatter of expert gradients over expert DP; the
    grad norm). Our experts are plain stacked parameters, so the flag is set right after that method.
    """
    if not enabled:
        yield
        return
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = getattr(DeepSpeedEngine, "_configure_distributed_model", None)
    _require(callable(original), "DeepSpeedEngine._configure_distributed_model")

    def configure(self: Any, model: torch.nn.Module) -> None:
        original(self, model)
        _require(hasattr(self, "has_moe_layers"), "DeepSpeedEngine.has_moe_layers")
        self.has_moe_layers = True

    DeepSpeedEngine._configure_distributed_model = configure
    try:
        yield
    finally:
        DeepSpeedEngine._configure_distributed_model = original
