"""The process-group mesh: world = PP x DP x CP x TP, TP innermost (adjacent ranks), then context
parallel (CP: each sample's sequence split across ranks), then data parallel, then pipeline stages.

rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank. With cp = 1 this is the order of
Megatron's `parallel_state` and of DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data,
model), so a `Mesh` and DeepSpeed's pipeline grid agree on who is who. Expert parallelism (EP) is
carved out of DP: the ep adjacent DP ranks of a block hold different experts, and the ranks with the
same expert index form the expert-data-parallel group that replicates (and ZeRO-partitions) them.
Dense weights are replicated across DP x CP: ZeRO partitions them over the `dp_cp` group.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch.distributed as dist

from megatrain.config import Layout

GROUPS = ("tp", "cp", "dp", "dp_cp", "pp", "ep", "expert_dp")


def rank_of(layout: Layout, pp_rank: int, dp_rank: int, cp_rank: int, tp_rank: int) -> int:
    return ((pp_rank * layout.dp + dp_rank) * layout.cp + cp_rank) * layout.tp + tp_rank


def group_ranks(layout: Layout) -> dict[str, list[list[int]]]:
    """Every process group of `layout` as lists of global ranks, by kind (what Mesh.build creates).

    Pure arithmetic, so any layout can be checked without processes (tests do it for 1,024 ranks).
    """
    pp, dp, cp, tp, ep = range(layout.pp), range(layout.dp), range(layout.cp), range(layout.tp), layout.ep
    rank = functools.partial(rank_of, layout)
    blocks = range(layout.dp // ep)
    return {
        "tp": [[rank(p, d, c, t) for t in tp] for p in pp for d in dp for c in cp],
        "cp": [[rank(p, d, c, t) for c in cp] for p in pp for d in dp for t in tp],
        "dp": [[rank(p, d, c, t) for d in dp] for p in pp for c in cp for t in tp],
        "dp_cp": [[rank(p, d, c, t) for d in dp for c in cp] for p in pp for t in tp],
        "pp": [[rank(p, d, c, t) for p in pp] for d in dp for c in cp for t in tp],
        "ep": [[rank(p, k * ep + e, c, t) for e in range(ep)] for p in pp for k in blocks for c in cp for t in tp],
        "expert_dp": [[rank(p, k * ep + e, c, t) for k in blocks] for p in pp for e in range(ep) for c in cp
                      for t in tp],
    }


@dataclass
class Mesh:
    """The one object that knows the layout, this rank's place in it and every process group.

    Everything else derives from it: the model's shard shapes, DeepSpeed's `mpu` (below), the
    checkpoint's layout record. Built without groups (`Mesh(Layout(tp=2))`) it still answers
    shapes, for code that only needs them (the planner's tests, meta-device models).
    """

    layout: Layout = field(default_factory=Layout)
    rank: int = 0
    tp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    cp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    dp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    dp_cp_group: dist.ProcessGroup | None = field(default=None, repr=False)  # ZeRO's group for dense weights
    pp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    ep_group: dist.ProcessGroup | None = field(default=None, repr=False)
    expert_dp_group: dist.ProcessGroup | None = field(default=None, repr=False)

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def cp(self) -> int:
        return self.layout.cp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp) % self.cp

    @property
    def dp_rank(self) -> int:
        return (self.rank // (self.tp * self.cp)) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.cp * self.dp)

    @property
    def ep_rank(self) -> int:
        """Which of the EP group's expert shards this rank holds."""
        return self.dp_rank % self.ep

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int, cp_rank: int = 0) -> int:
        return rank_of(self.layout, pp_rank, dp_rank, cp_rank, tp_rank)

    @classmethod
    def single(cls) -> Mesh:
        """A mesh of one process: every collective is a no-op."""
        return cls()

    @classmethod
    def build(cls, layout: Layout) -> Mesh:
        """Create every process group of the world; all ranks must call this together."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != layout.world:
            raise ValueError(f"the world has {world} ranks but the layout pp={layout.pp} x dp={layout.dp} x "
                             f"cp={layout.cp} x tp={layout.tp} needs {layout.world}")
        mesh = cls(layout=layout, rank=rank)
        # new_group is collective: every rank creates every group, in the same order. A kind whose groups
        # repeat another's ranks (dp_cp is dp when cp = 1) reuses it rather than open more communicators.
        created: dict[tuple[int, ...], dist.ProcessGroup] = {}
        for kind, groups in group_ranks(layout).items():
            for ranks in groups:
                key = tuple(ranks)
                if key not in created:
                    created[key] = dist.new_group(ranks)
                if rank in ranks:
                    setattr(mesh, f"{kind}_group", created[key])
        return mesh

    # The `mpu` interface DeepSpeed expects (Megatron's names). "Model parallel" is TP here:
    # DeepSpeed counts replicated parameters once per model-parallel group when clipping.
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup | None:
        return self.dp_group

    # DeepSpeed partitions ZeRO states over, broadcasts over and averages gradients over its "sequence data
    # parallel" group: DP x CP here. Its sequence-parallel size is left at 1 (no get_sequence_parallel_*):
    # with it DeepSpeed would sum over CP, but its ZeRO-3 reduce-scatter path ignores that (0.19.8: the
    # gradients came out divided by cp), so CP ranks average like DP ranks and each CP rank's loss
    # gradient is that of its own mean (parallel/context.py).
    def get_sequence_data_parallel_world_size(self) -> int:
        return self.dp * self.cp

    def get_sequence_data_parallel_rank(self) -> int:
        return self.dp_rank * self.cp + self.cp_rank

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup | None:
        return self.dp_cp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.pp_group
