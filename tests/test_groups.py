"""init_distributed takes the Layout resolve_layout returned, for the world size it was resolved
for."""
from __future__ import annotations

import pytest

from k2mcore.config.loader import load_config
from k2mcore.config.validate import resolve_layout
from k2mcore.parallel.groups import init_distributed


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
