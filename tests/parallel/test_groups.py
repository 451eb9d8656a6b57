"""init_distributed takes the Layout resolve_layout returned, for the world size it was resolved
for."""
from __future__ import annotations

import pytest

from k2mcore.config.loader import load_config
from k2mcore.parallel.groups import destroy_distributed, init_distributed
from k2mcore.parallel.layout import resolve_layout


def test_a_layout_for_another_world_size_is_refused_in_one_line():
    layout = resolve_layout(load_config("k2-tiny", ["parallel.tp=2", "parallel.sp=true"]), 2)
    with pytest.raises(ValueError, match=r"^the layout was resolved for 2 ranks, but this job "
                                         r"has 1$"):
        init_distributed(layout, seed=0)


def test_the_groups_carry_the_layout_and_this_ranks_place():
    layout = resolve_layout(load_config("k2-tiny"), 1)
    groups = init_distributed(layout, seed=0)
    assert groups.layout is layout
    assert (groups.rank, groups.tp_rank, groups.pp_rank, groups.dp_rank) == (0, 0, 0, 0)
    assert groups.is_last_stage and groups.holds("E") and groups.holds("L")


def test_the_same_layout_again_keeps_megatrons_groups_and_reseeds():
    """A second init_distributed for the same layout reuses megatron's groups (a destroyed gloo
    group's event loop lives on while old models reference it) but seeds as a fresh one; after
    destroy_distributed the groups are built anew. (A different layout at 1 rank does not exist:
    the multi-rank parity launches switch layouts.)"""
    import torch
    from megatron.core import parallel_state as ps

    cfg = load_config("k2-tiny")
    layout = resolve_layout(cfg, 1)
    init_distributed(layout, seed=5)
    tp_group, draw = ps.get_tensor_model_parallel_group(), torch.rand(4)
    init_distributed(resolve_layout(load_config("k2-tiny"), 1), seed=5)
    assert ps.get_tensor_model_parallel_group() is tp_group
    assert torch.equal(torch.rand(4), draw)  # the same seed, the same stream as the first time
    destroy_distributed()  # what a run does at its end: the next init builds anew
    init_distributed(layout, seed=5)
    assert ps.get_tensor_model_parallel_group() is not tp_group
