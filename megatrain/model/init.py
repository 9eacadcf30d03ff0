"""Layout-independent initialisation.

Each parameter's *full* tensor is drawn from a generator seeded by (seed, parameter name) and
this rank keeps its TP (routed experts: EP) slice, so TP=1, TP=2, EP=2, ZeRO-3 or a pipeline
stage all start from the same weights. Output projections get GPT-2/Megatron's scaled std
(set by the layers in `p.init`).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch

from megatrain.parallel.deepspeed_internals import unpartitioned_shape
from megatrain.parallel.mesh import Mesh


def shard(p: torch.Tensor, mesh: Mesh) -> tuple[int | None, int, int]:
    """(dim, parts, index): this rank holds slice `index` of `parts` of the full parameter along `dim`
    (None: the whole). Routed experts are split over EP (dim 0), TP-sharded layers over TP."""
    if getattr(p, "ep_dim", None) is not None:
        return p.ep_dim, mesh.ep, mesh.ep_rank
    return getattr(p, "tp_dim", None), mesh.tp, mesh.tp_rank


def full_shape(p: torch.Tensor, mesh: Mesh) -> list[int]:
    """The shape of the whole parameter: before ZeRO-3 partitioning, TP and EP sharding."""
    shape = list(unpartitioned_shape(p))
    dim, parts, _ = shard(p, mesh)
    if dim is not None:
        shape[dim] *= parts
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
        full = torch.empty(full_shape(p, mesh)).normal_(0.0, p.init[1], generator=gen)
        dim, parts, index = shard(p, mesh)
        if dim is not None:
            full = full.chunk(parts, dim=dim)[index]
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
