"""Layout-independent initialisation.

Each parameter's *full* tensor is drawn from a generator seeded by (seed, parameter name) and
this rank keeps its TP slice, so TP=1, TP=2, ZeRO-3 or a pipeline stage all start from the same
weights. Output projections get GPT-2/Megatron's scaled std (set by the layers in `p.init`).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch

from megatrain.parallel.deepspeed_internals import unpartitioned_shape
from megatrain.parallel.mesh import Mesh


def full_shape(p: torch.Tensor, tp: int) -> list[int]:
    """The shape of the whole parameter: before ZeRO-3 partitioning and TP sharding."""
    shape = list(unpartitioned_shape(p))
    if getattr(p, "tp_dim", None) is not None:
        shape[p.tp_dim] *= tp
    return shape


@torch.no_grad()
def init_parameter(p: torch.Tensor, name: str, seed: int, mesh: Mesh) -> None:
    """Fill p (this rank's slice) with its slice of the full tensor that (seed, name) defines."""
    kind = p.init[0]
    if kind == "ones":
        p.fill_(1.0)
    elif kind == "zeros":
        p.zero_()
    elif kind == "normal":
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.empty(full_shape(p, mesh.tp)).normal_(0.0, p.init[1], generator=gen)
        if p.tp_dim is not None:
            full = full.chunk(mesh.tp, dim=p.tp_dim)[mesh.tp_rank]
        p.copy_(full)
    else:
        raise ValueError(f"unknown init {p.init!r} for parameter {name}")


def canonical_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(layout-independent name, parameter) pairs: names as in the single-process `Transformer`.

    A pipeline stage names its parameters by layer index; it defines `canonical_name()` to map
    them back, so init, checkpoints and export see the same name in every layout.
    """
    rename = getattr(module, "canonical_name", None)
    for name, p in module.named_parameters():
        yield (rename(name) if rename else name), p
