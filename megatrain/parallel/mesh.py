"""The process-group mesh: world = PP x DP x TP, TP innermost (adjacent ranks).

rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank, the order of Megatron's
`parallel_state` and of DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model),
so a `Mesh` and DeepSpeed's pipeline grid agree on who is who.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from megatrain.config import Layout


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
    dp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    pp_group: dist.ProcessGroup | None = field(default=None, repr=False)

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    @classmethod
    def single(cls) -> Mesh:
        """A mesh of one process: every collective is a no-op."""
        return cls()

    @classmethod
    def build(cls, layout: Layout) -> Mesh:
        """Create every process group of the world; all ranks must call this together."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != layout.world:
            raise ValueError(f"the world has {world} ranks but the layout tp={layout.tp} x pp={layout.pp} x "
                             f"dp={layout.dp} needs {layout.world}")
        mesh = cls(layout=layout, rank=rank)
        # new_group is collective: every rank creates every group, in the same order.
        for stage in range(mesh.pp):
            for replica in range(mesh.dp):
                mesh._keep("tp_group", dist.new_group([mesh.rank_of(stage, replica, t) for t in range(mesh.tp)]))
        for stage in range(mesh.pp):
            for shard in range(mesh.tp):
                mesh._keep("dp_group", dist.new_group([mesh.rank_of(stage, d, shard) for d in range(mesh.dp)]))
        for replica in range(mesh.dp):
            for shard in range(mesh.tp):
                mesh._keep("pp_group", dist.new_group([mesh.rank_of(s, replica, shard) for s in range(mesh.pp)]))
        return mesh

    def _keep(self, name: str, group: dist.ProcessGroup) -> None:
        if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
            setattr(self, name, group)

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

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.pp_group
