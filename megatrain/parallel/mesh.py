"""The process-group mesh: world = PP x DP x TP, TP innermost (adjacent ranks).

rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank, the order of Megatron's
`parallel_state` and of DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model),
so a `Mesh` and DeepSpeed's pipeline grid agree on who is who.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass
class Mesh:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    tp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    dp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    pp_group: dist.ProcessGroup | None = field(default=None, repr=False)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

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
    def build(cls, tp: int, pp: int) -> Mesh:
        """Create every process group of the world; all ranks must call this together."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % (tp * pp):
            raise ValueError(f"world size {world} is not divisible by tp x pp = {tp} x {pp}")
        mesh = cls(tp=tp, pp=pp, dp=world // (tp * pp), rank=rank)
        r = range
        # new_group is collective: every rank creates every group, in the same order.
        for p in r(pp):
            for d in r(mesh.dp):
                mesh._keep("tp_group", dist.new_group([mesh.rank_of(p, d, t) for t in r(tp)]))
        for p in r(pp):
            for t in r(tp):
                mesh._keep("dp_group", dist.new_group([mesh.rank_of(p, d, t) for d in r(mesh.dp)]))
        for d in r(mesh.dp):
            for t in r(tp):
                mesh._keep("pp_group", dist.new_group([mesh.rank_of(p, d, t) for p in r(pp)]))
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
