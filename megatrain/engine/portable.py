"""Writing the portable copy (export/portable_format.py) from a running DeepSpeed engine, and loading it
into an engine of any layout: the full fp32 master weights and Adam moments of every TP shard are
gathered over DP (routed experts: over their expert-DP group, then over EP into the full [E, ...]
tensors), then set back through DeepSpeed's safe_get/set_full_* API.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatrain.config import ModelConfig
from megatrain.export.portable_format import (
    FORMAT,
    MOMENTS,
    STATE,
    TOKENIZER,
    PortableCheckpoint,
    ShardWriter,
    tensor_key,
)
from megatrain.model.init import canonical_parameters, full_shape, shard
from megatrain.parallel import deepspeed_internals as ds
from megatrain.parallel.mesh import Mesh

log = logging.getLogger("megatrain")


def full_value(p: torch.nn.Parameter, moment: str | None, engine: Any) -> torch.Tensor:
    """This TP rank's whole fp32 tensor (master weight or moment). Collective over the DP group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(p) if moment is None else safe_get_full_optimizer_state(p, moment)
    if value is None:  # ZeRO-0: the torch optimizer updates the parameter itself or its unlinked fp32 copy
        master = ds.unlinked_master(engine, p)
        value = master if moment is None else ds.base_optimizer(engine).state[master][moment]
    return value.detach().float().cpu().reshape(ds.unpartitioned_shape(p)).clone()


def gather_experts(value: torch.Tensor, p: torch.nn.Parameter, mesh: Mesh) -> torch.Tensor:
    """A routed-expert tensor of this EP rank -> all experts', concatenated in EP rank order (collective
    over EP); any other tensor as it is."""
    if getattr(p, "ep_dim", None) is None or mesh.ep == 1:
        return value
    parts = [torch.empty_like(value) for _ in range(mesh.ep)]
    dist.all_gather(parts, value, group=mesh.ep_group)
    return torch.cat(parts, dim=p.ep_dim)


def _saved_shape(p: torch.nn.Parameter, mesh: Mesh) -> list[int]:
    """The shape gather_experts(full_value(p, ...)) has: this TP rank's, all EP ranks' experts."""
    shape = list(ds.unpartitioned_shape(p))
    if getattr(p, "ep_dim", None) is not None and mesh.ep > 1:
        shape[p.ep_dim] *= mesh.ep
    return shape


def save(engine: Any, mesh: Mesh, directory: Path, *, step: int, model: ModelConfig,
         tokenizer_path: str | None = None, eod_id: int | None = None) -> None:
    """Collective: every rank calls it; DP rank 0 of each TP x PP shard writes."""
    base = ds.base_optimizer(engine)
    ds.relink_optimizer_state(engine)
    params = list(canonical_parameters(engine.module))
    mine = {name for name, p in params if p.tp_dim is not None or mesh.tp_rank == 0}  # replicated: TP rank 0
    shapes = {tensor_key(name, moment): _saved_shape(p, mesh)
              for name, p in params if name in mine for moment in (None, *MOMENTS)}
    tp_dims = {name: p.tp_dim for name, p in params if name in mine}
    writer = (ShardWriter(directory, mesh.pp_rank, mesh.tp_rank, mesh.tp, shapes, tp_dims)
              if mesh.dp_rank == 0 else None)
    with writer or contextlib.nullcontext():
        for name, p in params:
            for moment in (None, *MOMENTS):
                value = gather_experts(full_value(p, moment, engine), p, mesh)  # every rank gathers
                if writer and name in mine:  # the writer holds one tensor at a time
                    writer.write(tensor_key(name, moment), value)
    if mesh.rank == 0:
        state = {"format": FORMAT, "step": step, "model": asdict(model), "tp": mesh.tp, "pp": mesh.pp,
                 "optimizer_step": _optimizer_step(base), "scheduler": engine.lr_scheduler.state_dict()}
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, directory / TOKENIZER)
            from tokenizers import Tokenizer

            state["eod_token"] = Tokenizer.from_file(tokenizer_path).id_to_token(eod_id) if eod_id is not None else None
        (directory / STATE).write_text(json.dumps(state, indent=1))


def _optimizer_step(base: torch.optim.Optimizer) -> int:
    for state in base.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def local_slice(full: torch.Tensor, p: torch.nn.Parameter, mesh: Mesh) -> torch.Tensor:
    dim, parts, index = shard(p, mesh)
    return full if dim is None else full.chunk(parts, dim=dim)[index].contiguous()


@torch.no_grad()
def set_parameter(p: torch.nn.Parameter, value: torch.Tensor, master: torch.Tensor | None = None) -> None:
    """Set this TP rank's parameter everywhere it lives: model weight (any ZeRO stage) and fp32 master
    (linked, or `master`: ZeRO-0's unlinked copy)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=ds.is_zero3_partitioned(p)):
        p.data.copy_(value.reshape(p.shape))
    safe_set_full_fp32_param(p, value.to(p.device))
    if master is not None and master is not p:
        master.copy_(value.reshape(master.shape))


def check_shapes(module: torch.nn.Module, mesh: Mesh, shapes: dict[str, list[int]], source: str) -> None:
    """Fail before touching any weight if `source` holds another model than this run builds."""
    mine = {name: full_shape(p, mesh) for name, p in canonical_parameters(module)}
    missing = sorted(set(mine) - set(shapes))
    wrong = {n: (shapes[n], mine[n]) for n in mine if n in shapes and list(shapes[n]) != mine[n]}
    if missing or wrong:
        raise ValueError(f"{source} does not fit this model: missing {missing[:5]}, "
                         f"shapes (saved, now) {dict(list(wrong.items())[:5])}; use the same model.* keys")


def load(engine: Any, mesh: Mesh, directory: Path) -> PortableCheckpoint:
    """Collective: restore weights, Adam moments, optimizer step and LR schedule into any layout.

    The engine was built normally for this run's layout; returns the checkpoint read (`.state` is its
    state.json, `.bytes_read` what this rank read).
    """
    from deepspeed.utils import safe_set_full_optimizer_state

    source = PortableCheckpoint(directory)
    check_shapes(engine.module, mesh, {n: source.shape(n) for n in source.names()}, str(directory))
    base = ds.base_optimizer(engine)
    _create_optimizer_state(engine, source.state["optimizer_step"])
    for name, p in canonical_parameters(engine.module):  # this stage's parameters, this TP / EP rank's slices
        master = None if ds.has_fp32_master(p) else ds.unlinked_master(engine, p)
        set_parameter(p, source.local(name, None, *shard(p, mesh)), master)
        for moment in MOMENTS:
            value = source.local(name, moment, *shard(p, mesh)).to(p.device)
            if master is None:
                safe_set_full_optimizer_state(p, value, moment)
            else:  # ZeRO-0: state keyed by the parameter itself or its unlinked fp32 copy
                base.state[master][moment].copy_(value.reshape(master.shape))
    # One schedule for every param group: its per-group lists repeat one value; fit them to this optimizer's
    # groups (a MoE model's routed experts are a group of their own; copies written before had two groups)
    scheduler = {k: v[:1] * len(base.param_groups) if k in ("base_lrs", "_last_lr") else v
                 for k, v in source.state["scheduler"].items()}
    engine.lr_scheduler.load_state_dict(scheduler)
    for group, lr in zip(base.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr  # the scheduler sets rates only when it steps; the next step needs this one
    ds.set_step_counters(engine, source.state["step"])
    log.info("portable copy %s: this rank read %.1f MB of its %.1f MB (its stage and TP slices)", directory,
             source.bytes_read / 1e6, source.file_bytes() / 1e6)
    return source


def _create_optimizer_state(engine: Any, step: int) -> None:
    """Adam state exists only after a first step: create it (zeros, then overwritten) so it can be set."""
    base = ds.base_optimizer(engine)
    for q in ds.master_partitions(engine):
        state = base.state[q]
        for moment in MOMENTS:
            state.setdefault(moment, torch.zeros_like(q, memory_format=torch.preserve_format))
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=q.device)
    ds.relink_optimizer_state(engine)
