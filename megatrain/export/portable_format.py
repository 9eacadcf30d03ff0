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
import math
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from megatrain.config import ModelConfig

DIR = "portable"
STATE = "state.json"
TOKENIZER = "tokenizer.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
FORMAT = 1


def tensor_key(name: str, moment: str | None) -> str:
    """The key of a parameter's master weight (moment None) or Adam moment in a shard file."""
    return name if moment is None else f"{moment}/{name}"


class ShardWriter:
    """One (PP stage, TP rank) file, written tensor by tensor: every key's shape is known before any value
    (the safetensors header comes first), so the writer holds one tensor at a time, not its shard's whole
    fp32 state (12 B/param: save_file needs every tensor at once). Values must come in `shapes`' order."""

    def __init__(self, directory: Path, pp_rank: int, tp_rank: int, tp: int, shapes: dict[str, list[int]],
                 tp_dims: dict[str, int | None]):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"pp{pp_rank:03d}-tp{tp_rank:03d}.safetensors"
        header: dict = {"__metadata__": {"tp_dims": json.dumps(tp_dims), "tp": str(tp), "tp_rank": str(tp_rank)}}
        offset = 0
        for key, shape in shapes.items():
            size = 4 * math.prod(shape)
            header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes with trailing spaces
        self._pending = list(shapes.items())[::-1]
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, value: torch.Tensor) -> None:
        if not self._pending:
            raise ValueError(f"{self.path}: {key} is not in the header (all tensors already written)")
        want, shape = self._pending.pop()
        if key != want or list(value.shape) != list(shape) or value.dtype != torch.float32:
            raise ValueError(f"{self.path}: expected {want} float32 {shape}, got {key} {value.dtype} "
                             f"{list(value.shape)}")
        self._file.write(value.detach().cpu().contiguous().numpy().data)  # little-endian, as the format is

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        if exc[0] is None and self._pending:
            raise ValueError(f"{self.path}: {len(self._pending)} tensors never written, first "
                             f"{self._pending[-1][0]}")


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
        self.bytes_read = 0  # tensor bytes read from the shard files so far
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
        return self.local(name, moment, None, 1, 0)

    def local(self, name: str, moment: str | None, tp_dim: int | None, tp: int, tp_rank: int) -> torch.Tensor:
        """Slice `tp_rank` of `tp` along `tp_dim` (None or tp=1: the whole tensor), reading only its bytes.

        The saved TP slices overlapping the wanted range are read through safetensors' get_slice, so a
        rank of any layout reads about its own share, not the whole model; `bytes_read` counts them.
        """
        if name not in self.index:
            raise KeyError(f"parameter {name} is not in the portable checkpoint {self.directory}")
        saved_dim, files = self.index[name]
        key = tensor_key(name, moment)
        if saved_dim is not None and sorted(files) != list(range(self.tp)):
            raise ValueError(f"{self.directory}: parameter {name} has TP slices {sorted(files)} of {self.tp}")
        dim = saved_dim if tp_dim is None or tp == 1 else tp_dim
        if dim is None:  # replicated and wanted whole
            return self._read(files[min(files)], key, 0, None)
        full = self.shape(name)[dim]
        lo, hi = (0, full) if tp_dim is None or tp == 1 else (tp_rank * full // tp, (tp_rank + 1) * full // tp)
        if saved_dim is None:
            return self._read(files[min(files)], key, dim, (lo, hi))
        if saved_dim != dim:
            raise ValueError(f"{self.directory}: parameter {name} is split along dim {saved_dim}, not {dim}")
        width = full // self.tp  # each saved file holds [r * width, (r + 1) * width)
        parts = [self._read(files[r], key, dim, (max(lo, r * width) - r * width, min(hi, (r + 1) * width) - r * width))
                 for r in range(lo // width, (hi - 1) // width + 1)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def _read(self, path: Path, key: str, dim: int, bounds: tuple[int, int] | None) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            if bounds is None:
                value = f.get_tensor(key)
            else:
                value = f.get_slice(key)[(slice(None),) * dim + (slice(*bounds),)]
        self.bytes_read += value.numel() * value.element_size()
        return value

    def file_bytes(self) -> int:
        """Bytes of every shard file: what reading the whole copy costs."""
        return sum(p.stat().st_size for p in self.directory.glob("*.safetensors"))

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
