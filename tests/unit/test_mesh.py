"""The mesh's process groups follow the layout rules for every layout, checked without processes (the rank
arithmetic) and with torch.distributed's fake backend (one process standing in for rank r of 1,024)."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatrain.config import Layout
from megatrain.parallel.mesh import GROUPS, Mesh, group_ranks

LAYOUTS = [Layout(tp=2, pp=2, dp=2), Layout(tp=8, pp=8, dp=16), Layout(tp=2, pp=2, dp=4, cp=2, ep=2),
           Layout(tp=4, dp=8, cp=4, ep=4), Layout(tp=1, pp=1, dp=6, ep=3)]


def _coords(layout: Layout, rank: int) -> dict[str, int]:
    tp, cp, dp = layout.tp, layout.cp, layout.dp
    d = (rank // (tp * cp)) % dp
    return {"tp": rank % tp, "cp": (rank // tp) % cp, "dp": d, "pp": rank // (tp * cp * dp),
            "ep": d % layout.ep, "block": d // layout.ep}


# For each kind of group: the coordinates its members share, and its size.
SHARED = {"tp": ("pp", "dp", "cp"), "cp": ("pp", "dp", "tp"), "dp": ("pp", "cp", "tp"), "dp_cp": ("pp", "tp"),
          "pp": ("dp", "cp", "tp"), "ep": ("pp", "block", "cp", "tp"), "expert_dp": ("pp", "ep", "cp", "tp")}


def _size(layout: Layout, kind: str) -> int:
    return {"tp": layout.tp, "cp": layout.cp, "dp": layout.dp, "dp_cp": layout.dp * layout.cp, "pp": layout.pp,
            "ep": layout.ep, "expert_dp": layout.dp // layout.ep}[kind]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"tp{lay.tp}pp{lay.pp}dp{lay.dp}cp{lay.cp}ep{lay.ep}")
def test_every_kind_of_group_partitions_the_world_by_the_layout_rules(layout):
    groups = group_ranks(layout)
    assert set(groups) == set(GROUPS)
    for kind, lists in groups.items():
        members = sorted(r for ranks in lists for r in ranks)
        assert members == list(range(layout.world)), f"{kind} groups do not cover each rank once"
        for ranks in lists:
            assert len(ranks) == _size(layout, kind)
            shared = {tuple(_coords(layout, r)[c] for c in SHARED[kind]) for r in ranks}
            assert len(shared) == 1, f"a {kind} group mixes ranks of different {SHARED[kind]}"
    assert all(ranks == list(range(ranks[0], ranks[0] + layout.tp)) for ranks in groups["tp"])  # TP adjacent


def test_expert_groups_are_carved_out_of_data_parallel_groups():
    layout = Layout(tp=2, dp=8, cp=2, ep=4)
    groups = group_ranks(layout)
    dp_sets = [set(ranks) for ranks in groups["dp"]]
    for kind in ("ep", "expert_dp"):
        assert all(any(set(ranks) <= dp for dp in dp_sets) for ranks in groups[kind])


@pytest.mark.parametrize("rank", [0, 37, 513, 1023])
def test_a_rank_of_a_1024_rank_world_gets_its_groups(rank):
    layout = Layout(tp=8, pp=4, dp=8, cp=4, ep=2)
    dist.init_process_group("fake", rank=rank, world_size=layout.world, store=FakeStore())
    try:
        mesh = Mesh.build(layout)
        expected = {kind: next(ranks for ranks in lists if rank in ranks)
                    for kind, lists in group_ranks(layout).items()}
        for kind, ranks in expected.items():
            assert dist.get_process_group_ranks(getattr(mesh, f"{kind}_group")) == ranks, kind
        coords = _coords(layout, rank)
        assert (mesh.tp_rank, mesh.cp_rank, mesh.dp_rank, mesh.pp_rank, mesh.ep_rank) == (
            coords["tp"], coords["cp"], coords["dp"], coords["pp"], coords["ep"])
        assert mesh.rank_of(mesh.pp_rank, mesh.dp_rank, mesh.tp_rank, mesh.cp_rank) == rank
    finally:
        dist.destroy_process_group()
