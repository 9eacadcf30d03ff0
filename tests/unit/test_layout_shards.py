"""Layouts too large to run here, checked anyway: llama-70b at TP8 x PP8 x DP16 (1,024 ranks) and TP8 x DP128
with ZeRO-3. One process stands in for a sample of ranks (torch.distributed's fake backend); each builds its
pipeline stage exactly as training does (DeepSpeed's PipelineModule, our TP layers) on the meta device, so no
weight is allocated, and its parameter shard shapes and counts must be those the planner reports."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatrain.model.init import canonical_parameters
from megatrain.model.transformer import Transformer
from megatrain.parallel.mesh import Mesh
from megatrain.parallel.stages import stage_boundaries
from megatrain.plan import plan
from tests.unit.test_plan import preset

WORLD = 1024


def _full_shapes(cfg) -> dict[str, list[int]]:
    """Every parameter's whole shape, from the single-process model (on the meta device: no memory)."""
    with torch.device("meta"):
        return {name: list(p.shape) for name, p in canonical_parameters(Transformer(cfg.model))}


def _stage_names(names, cfg, stage: int, pp: int) -> set[str]:
    """The parameters stage `stage` must hold: its blocks, the embedding on the first, the head on the last."""
    bounds = stage_boundaries(cfg.model, pp, cfg.train.seq_len, cfg.parallel.pp_split)
    blocks = {f"blocks.{i}." for i in range(bounds[stage], bounds[stage + 1])}
    return {n for n in names if any(n.startswith(b) for b in blocks)
            or (stage == 0 and n.startswith("embed.")) or (stage == pp - 1 and n.startswith("head."))}


@pytest.fixture
def fake_world():
    """A fake process group of WORLD ranks that DeepSpeed's communication layer also uses."""
    import deepspeed

    from megatrain.parallel import deepspeed_internals as ds

    os.environ.setdefault("LOCAL_RANK", "0")  # PipelineModule reads it
    ds.skip_shm_comm_op()

    def start(rank: int) -> None:
        dist.init_process_group("fake", rank=rank, world_size=WORLD, store=FakeStore())
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def test_llama_70b_tp8_pp8_dp16_stage_shards_are_what_the_planner_counts(fake_world, monkeypatch):
    from megatrain.model.pipeline import TransformerPipe

    cfg = preset("llama-70b", "parallel.tp=8", "parallel.pp=8", "parallel.sequence_parallel=true",
                 "parallel.zero_stage=1", "train.seq_len=4096", "train.micro_batch_size=1",
                 "train.global_batch_size=128")
    planned = plan(cfg, WORLD)
    layout = planned.layout
    assert (layout.tp, layout.pp, layout.dp) == (8, 8, 16)
    full = _full_shapes(cfg)
    # PipelineModule moves its stage to the accelerator when built; a meta tensor has no data to move.
    monkeypatch.setattr(TransformerPipe, "to", lambda self, *args, **kwargs: self)
    samples = [(stage, dp_rank, tp_rank) for stage in (0, 3, 7) for dp_rank, tp_rank in ((0, 0), (9, 5), (15, 7))]
    for stage, dp_rank, tp_rank in samples:
        mesh = Mesh(layout)
        rank = mesh.rank_of(stage, dp_rank, tp_rank)
        fake_world(rank)
        mesh = Mesh.build(layout)
        assert (mesh.pp_rank, mesh.dp_rank, mesh.tp_rank) == (stage, dp_rank, tp_rank)
        with torch.device("meta"):
            pipe = TransformerPipe(cfg.model, mesh, checkpointing="full", seq_len=cfg.train.seq_len)
        held = dict(canonical_parameters(pipe))
        assert set(held) == _stage_names(full, cfg, stage, layout.pp), f"rank {rank}: wrong parameters"
        for name, p in held.items():
            assert p.is_meta, name
            expected = list(full[name])
            if p.tp_dim is not None:
                expected[p.tp_dim] //= layout.tp
            assert list(p.shape) == expected, f"rank {rank}: {name} is {list(p.shape)}, expected {expected}"
        count = sum(p.numel() for p in held.values())
        assert count == planned.stage_params[stage], f"rank {rank} (stage {stage}) holds {count:,} parameters"
        if stage in (0, layout.pp - 1):  # bf16 ZeRO-1: each rank keeps its stage's whole bf16 weights
            assert planned.first_last_memory[min(stage, 1)].weights == 2 * count
        dist.destroy_process_group()
    assert planned.params_per_rank == max(planned.stage_params)
    assert sum(planned.stage_params) * layout.tp > planned.params.total  # replicated norms count on every TP rank


def test_llama_70b_tp8_zero3_dp128_partition_is_what_the_planner_counts(fake_world):
    """ZeRO-3 partitions each TP rank's parameters over DP: the planner's weights are 2 bytes x P / DP."""
    cfg = preset("llama-70b", "parallel.tp=8", "parallel.zero_stage=3", "train.seq_len=4096",
                 "train.micro_batch_size=1", "train.global_batch_size=128")
    planned = plan(cfg, WORLD)
    layout = planned.layout
    assert (layout.tp, layout.pp, layout.dp) == (8, 1, 128)
    full = _full_shapes(cfg)
    for rank in (0, 517, WORLD - 1):
        fake_world(rank)
        mesh = Mesh.build(layout)
        with torch.device("meta"):
            model = Transformer(cfg.model, mesh, layout.sequence_parallel)
        held = dict(canonical_parameters(model))
        assert set(held) == set(full)
        for name, p in held.items():
            expected = list(full[name])
            if p.tp_dim is not None:
                expected[p.tp_dim] //= layout.tp
            assert list(p.shape) == expected, name
        count = sum(p.numel() for p in held.values())
        assert count == planned.params_per_rank
        assert planned.memory.weights == pytest.approx(2 * count / layout.dp)
        dist.destroy_process_group()
