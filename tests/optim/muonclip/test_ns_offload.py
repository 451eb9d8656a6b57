"""The Newton-Schulz offload planner (k2mcore.optim.muonclip.ns_offload) by hand and its invariants.
The K2-shape targets with offloads are in test_shard_plan.py."""
from __future__ import annotations

import dataclasses

import pytest

from k2mcore.optim.muonclip.ns_offload import _jobs, offload_bytes, plan_offload
from k2mcore.optim.muonclip.shard_plan import ParamSpec, StageChunk, World, ns_flops, plan_stage


def mat(name, rows, cols, **kw):
    return ParamSpec(name, rows * cols, (rows, cols), muon=True, **kw)


def _stage(world, dense, experts):
    return plan_stage([StageChunk(dense=dense, experts=experts)], world)


def _expert_dp1():
    """DP2 x EP2 (expert-DP 1): each rank has four 64x128 expert matrices; one large dense
    fused fc1 (two 256x256 halves) lands on one rank, which is then far above the mean."""
    experts = [[mat(f"e{e}.{i}", 64, 128) for i in range(4)] for e in range(2)]
    dense = [mat("fc1", 512, 256, split_rows=2), ParamSpec("norm", 256)]
    return _stage(World(dp=2, ep=2), dense, experts)


def test_jobs_are_row_blocks_and_cover_every_matrix_once():
    stage = _expert_dp1()
    jobs = [j for js in _jobs(stage).values() for j in js]
    assert sorted((j.name, j.half) for j in jobs) == sorted(
        [("fc1", 0), ("fc1", 1)] + [(f"e{e}.{i}", 0) for e in range(2) for i in range(4)])
    fc1 = [j for j in jobs if j.name == "fc1"]
    assert all(j.shape == (256, 256) and j.cost == ns_flops(256, 256) and j.halves == 2
               for j in fc1)
    assert sum(j.cost for j in jobs) == sum(stage.loads.values())


def test_an_overloaded_rank_hands_a_half_to_the_other_by_hand():
    stage = _expert_dp1()
    fc1, expert = ns_flops(256, 256), ns_flops(64, 128)
    holder = max(stage.loads, key=stage.loads.get)
    assert stage.loads[holder] == 2 * fc1 + 4 * expert  # the fc1 and its own experts
    off = plan_offload(stage, budget_bytes=10**9, wire_bytes=2)
    # one fc1 half moves; the other rank then sheds its own experts back only if that helps
    halves = [m for m in off.offloads if m.name == "fc1"]
    assert len(halves) == 1 and halves[0].holder == holder and halves[0].helper != holder
    assert max(off.loads.values()) < max(stage.loads.values())
    assert sum(off.loads.values()) == sum(stage.loads.values())
    for r in off.loads:  # the loads are the planned ones moved by the offloads
        moved = sum(m.cost for m in off.offloads if m.helper == r) - sum(
            m.cost for m in off.offloads if m.holder == r)
        assert off.loads[r] == stage.loads[r] + moved
    assert offload_bytes(off, 2) == sum(2 * 2 * m.numel for m in off.offloads)


def test_jobs_move_at_most_once_and_never_to_their_holder():
    experts = [[mat(f"e{e}.{i}", 32 + 8 * i, 128) for i in range(6)] for e in range(4)]
    dense = [mat(f"d{i}", 64 * (i + 1), 128) for i in range(5)]
    stage = _stage(World(dp=4, ep=4), dense, experts)
    off = plan_offload(stage, budget_bytes=10**9, wire_bytes=4)
    keys = [(m.chunk, m.expert, m.ep, m.name, m.half) for m in off.offloads]
    assert len(keys) == len(set(keys)) and all(m.helper != m.holder for m in off.offloads)
    assert off.offloads == sorted(off.offloads, key=lambda m: (m.holder, m.chunk, m.expert,
                                                               m.name, m.half))
    assert plan_offload(stage, budget_bytes=10**9, wire_bytes=4) == off  # deterministic


def test_the_budget_bounds_the_bytes_and_zero_or_tp_means_none():
    stage = _expert_dp1()
    assert plan_offload(stage, budget_bytes=0, wire_bytes=2) is stage
    half = 2 * 256 * 256 * 2  # one fc1 half, both ways, bf16
    assert plan_offload(stage, budget_bytes=half - 1, wire_bytes=2).offloads == []
    for limit in (2 * half, 10**9):  # the helper also sheds a few of its own experts
        off = plan_offload(stage, budget_bytes=limit, wire_bytes=2)
        assert 0 < offload_bytes(off, 2) <= limit
    tp = _stage(World(tp=2, dp=2), [mat("a", 256, 256), mat("b", 64, 64)], [])
    assert plan_offload(tp, budget_bytes=10**9, wire_bytes=2) is tp


@pytest.mark.parametrize("kw,words", [
    (dict(budget_bytes=-1, wire_bytes=2), "budget_bytes must be >= 0"),
    (dict(budget_bytes=10, wire_bytes=0), "wire_bytes >= 1"),
])
def test_bad_arguments_fail_in_one_line(kw, words):
    with pytest.raises(ValueError, match=words) as err:
        plan_offload(_expert_dp1(), **kw)
    assert "\n" not in str(err.value)


def test_a_balanced_stage_offloads_nothing():
    stage = _stage(World(dp=2), [mat("a", 64, 128), mat("b", 64, 128)], [])
    assert dataclasses.replace(stage) == plan_offload(stage, budget_bytes=10**9, wire_bytes=2)
