"""The portable checkpoint format: a layout-independent copy of the training state.

`<checkpoint>/portable/` holds one safetensors file per (PP stage, TP rank), written by DP rank 0 of
that model-parallel group: the fp32 master weight of every parameter under its canonical name (the
single-process `Transformer` name) and the Adam moments as `exp_avg/<name>`, `exp_avg_sq/<name>`.
TP-split tensors are stored as this rank's slice with the split dim in the file's metadata;
replicated ones are written by TP rank 0 only. `state.json` adds the model config, the optimizer
step, the LR scheduler and the tokenizer's EOD token; the tokenizer file is copied beside it.

DeepSpeed's own files resume the same layout bit for bit. This copy resumes any other
(TP, PP, DP, ZeRO stage, precision) and is what export reads: reading it needs neither a process
group nor DeepSpeed. (DeepSpeed's universal checkpoint needs an offline conversion and per-model
TP patterns; a consolidated file per shard needs neither.) Writing it from a running engine is
engine/portable.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatrain.config import ModelConfig
from megatrain.data.manifest import with_umask_mode

DIR = "portable"
STATE = "state.json"
TOKENIZER = "tokenizer.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
FORMAT = 1


def tensor_key(name: str, moment: str | None) -> str:
    """The key of a parameter's master weight (moment None) or Adam moment in a shard file."""
    return name if moment is None else f"{moment}/{name}"


def write_shard(directory: Path, pp_rank: int, tp_rank: int, tp: int, tensors: dict[str, torch.Tensor],
                tp_dims: dict[str, int | None]) -> None:
    """One (PP stage, TP rank) file: its tensors and, per parameter, the dim TP splits (None: replicated)."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"tp_dims": json.dumps(tp_dims), "tp": str(tp), "tp_rank": str(tp_rank)}
    path = directory / f"pp{pp_rank:03d}-tp{tp_rank:03d}.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with_umask_mode(path)  # safetensors creates 0600


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
                parts.append(f.get_tensor(tensor_key(name, moment)))
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
