"""A layout-independent copy of the training state, written inside every checkpoint.

`<checkpoint>/portable/` holds one safetensors file per (PP stage, TP rank), written by DP rank 0 of
that model-parallel group: the fp32 master weight of every parameter under its canonical name (the
single-process `Transformer` name) and the Adam moments as `exp_avg/<name>`, `exp_avg_sq/<name>`.
TP-split tensors are stored as this rank's slice with the split dim in the file's metadata;
replicated ones are written by TP rank 0 only. `state.json` adds the model config, the optimizer
step, the LR scheduler and the tokenizer's EOD token; the tokenizer file is copied beside it.

DeepSpeed's own files resume the same layout bit for bit. This copy resumes any other
(TP, PP, DP, ZeRO stage, precision) and is what export reads: reading it needs neither a process
group nor DeepSpeed. (DeepSpeed's universal checkpoint needs an offline conversion and per-model
TP patterns; a consolidated file per shard needs neither.)
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatrain.config import ModelConfig
from megatrain.model.init import canonical_parameters, full_shape
from megatrain.parallel.mesh import Mesh

log = logging.getLogger("megatrain")

DIR = "portable"
STATE = "state.json"
TOKENIZER = "tokenizer.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
FORMAT = 1


def _key(name: str, moment: str | None) -> str:
    return name if moment is None else f"{moment}/{name}"


def _base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed drives (ZeRO and bf16 wrap it; plain ZeRO-0 fp32 does not)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _full_value(p: torch.nn.Parameter, moment: str | None, base: torch.optim.Optimizer) -> torch.Tensor:
    """This TP rank's whole fp32 tensor (master weight or moment). Collective over the DP group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(p) if moment is None else safe_get_full_optimizer_state(p, moment)
    if value is None:  # ZeRO-0 in fp32: the torch optimizer updates the parameter itself
        value = p if moment is None else base.state[p][moment]
    return value.detach().float().cpu().reshape(getattr(p, "ds_shape", p.shape)).clone()


def save(engine: Any, mesh: Mesh, directory: Path, *, step: int, model: ModelConfig,
         tokenizer_path: str | None = None, eod_id: int | None = None) -> None:
    """Collective: every rank calls it; DP rank 0 of each TP x PP shard writes."""
    base = _base_optimizer(engine)
    _link_optimizer_state(engine)
    writer = mesh.dp_rank == 0
    tensors: dict[str, torch.Tensor] = {}
    tp_dims: dict[str, int | None] = {}
    for name, p in canonical_parameters(engine.module):
        values = {m: _full_value(p, m, base) for m in (None, *MOMENTS)}  # every DP rank joins the gather
        if writer and (p.tp_dim is not None or mesh.tp_rank == 0):
            tensors.update({_key(name, m): v for m, v in values.items()})
            tp_dims[name] = p.tp_dim
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"tp_dims": json.dumps(tp_dims), "tp": str(mesh.tp), "tp_rank": str(mesh.tp_rank)}
        save_file(tensors, str(directory / f"pp{mesh.pp_rank:03d}-tp{mesh.tp_rank:03d}.safetensors"), metadata=meta)
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


class PortableCheckpoint:
    """Read access to a portable directory: whole (TP-concatenated) tensors by canonical name."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        if not (self.directory / STATE).is_file():
            raise FileNotFoundError(f"{self.directory} holds no {STATE}: not a portable checkpoint "
                                    "(checkpoints are written with one since megatrain 0.1)")
        self.state = json.loads((self.directory / STATE).read_text())
        self.model = ModelConfig(**self.state["model"])
        self.tp = int(self.state["tp"])
        # name -> (tp_dim, {tp_rank: file}); a tied embedding on two pipeline stages appears twice: same values
        self.index: dict[str, tuple[int | None, dict[int, Path]]] = {}
        for path in sorted(self.directory.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
            for name, tp_dim in json.loads(meta["tp_dims"]).items():
                self.index.setdefault(name, (tp_dim, {}))[1].setdefault(int(meta["tp_rank"]), path)

    def names(self) -> list[str]:
        return list(self.index)

    def tensor(self, name: str, moment: str | None = None) -> torch.Tensor:
        """The full fp32 tensor: TP slices concatenated along their split dim."""
        if name not in self.index:
            raise KeyError(f"parameter {name} is not in the portable checkpoint {self.directory}")
        tp_dim, files = self.index[name]
        parts = []
        for rank in sorted(files):
            with safe_open(str(files[rank]), framework="pt") as f:
                parts.append(f.get_tensor(_key(name, moment)))
        if tp_dim is None:
            return parts[0]
        if sorted(files) != list(range(self.tp)):
            raise ValueError(f"{self.directory}: parameter {name} has TP slices {sorted(files)} of {self.tp}")
        return torch.cat(parts, dim=tp_dim)

    def shape(self, name: str) -> list[int]:
        """The full shape, read from the file headers only."""
        tp_dim, files = self.index[name]
        shapes = []
        for path in files.values():
            with safe_open(str(path), framework="pt") as f:
                shapes.append(list(f.get_slice(name).get_shape()))
        if tp_dim is not None:
            shapes[0][tp_dim] = sum(s[tp_dim] for s in shapes)
        return shapes[0]

    def weights(self) -> dict[str, torch.Tensor]:
        """Every full fp32 weight by canonical name (what export needs)."""
        return {name: self.tensor(name) for name in self.names()}


def local_slice(full: torch.Tensor, p: torch.nn.Parameter, mesh: Mesh) -> torch.Tensor:
    return full if p.tp_dim is None else full.chunk(mesh.tp, dim=p.tp_dim)[mesh.tp_rank].contiguous()


@torch.no_grad()
def set_parameter(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set this TP rank's parameter everywhere it lives: model weight (any ZeRO stage) and fp32 master."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    zero3 = hasattr(p, "ds_id")
    with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=zero3):
        p.data.copy_(value.reshape(p.shape))
    safe_set_full_fp32_param(p, value.to(p.device))


def check_shapes(module: torch.nn.Module, mesh: Mesh, shapes: dict[str, list[int]], source: str) -> None:
    """Fail before touching any weight if `source` holds another model than this run builds."""
    mine = {name: full_shape(p, mesh.tp) for name, p in canonical_parameters(module)}
    missing = sorted(set(mine) - set(shapes))
    wrong = {n: (shapes[n], mine[n]) for n in mine if n in shapes and list(shapes[n]) != mine[n]}
    if missing or wrong:
        raise ValueError(f"{source} does not fit this model: missing {missing[:5]}, "
                         f"shapes (saved, now) {dict(list(wrong.items())[:5])}; use the same model.* keys")


def load(engine: Any, mesh: Mesh, directory: Path) -> dict[str, Any]:
    """Collective: restore weights, Adam moments, optimizer step and LR schedule into any layout.

    The engine was built normally for this run's layout; returns the portable state.json.
    """
    from deepspeed.utils import safe_set_full_optimizer_state

    source = PortableCheckpoint(directory)
    check_shapes(engine.module, mesh, {n: source.shape(n) for n in source.names()}, str(directory))
    base = _base_optimizer(engine)
    _create_optimizer_state(engine, base, source.state["optimizer_step"])
    for name, p in canonical_parameters(engine.module):
        set_parameter(p, local_slice(source.tensor(name), p, mesh))
        for moment in MOMENTS:
            value = local_slice(source.tensor(name, moment), p, mesh).to(p.device)
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                safe_set_full_optimizer_state(p, value, moment)
            else:  # ZeRO-0 in fp32: state keyed by the parameter itself
                base.state[p][moment].copy_(value.reshape(p.shape))
    engine.lr_scheduler.load_state_dict(source.state["scheduler"])
    for group, lr in zip(base.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr  # the scheduler sets rates only when it steps; the next step needs this one
    engine.global_steps = source.state["step"]
    engine.global_samples = source.state["step"] * engine.train_batch_size()
    return source.state


def _create_optimizer_state(engine: Any, base: torch.optim.Optimizer, step: int) -> None:
    """Adam state exists only after a first step: create it (zeros, then overwritten) so it can be set."""
    for q in _flat_master_tensors(engine, base):
        state = base.state[q]
        for moment in MOMENTS:
            state.setdefault(moment, torch.zeros_like(q, memory_format=torch.preserve_format))
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=q.device)
    _link_optimizer_state(engine)


def _flat_master_tensors(engine: Any, base: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors the torch optimizer keeps state for: ZeRO-3, ZeRO-1/2 and bf16 flat fp32 partitions."""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(engine.optimizer, attr):
            return list(getattr(engine.optimizer, attr))
    return [q for group in base.param_groups for q in group["params"]]


def _link_optimizer_state(engine: Any) -> None:
    """Point every parameter of ZeRO-1/2 and the bf16 optimizer at its slice of the flat Adam state.

    DeepSpeed links them once, right after the first parameter group's first step, so the other
    groups (here: norms and biases) stay unlinked and their moments unreachable; linking again now
    that every group has state fixes that.
    """
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()
