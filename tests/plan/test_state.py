"""k2mcore.plan.state against hand-computed buffers and the K2 preset's published figures
(the real-allocation check is tests/parity/test_plan_parity.py)."""
from __future__ import annotations

import math

import pytest

from k2mcore.config.loader import load_config
from k2mcore.optim.muonclip.shard_plan import ParamSpec
from k2mcore.parallel.layout import resolve_layout
from k2mcore.parallel.param_counts import megatron_param_shapes, stage_parameters
from k2mcore.plan.state import stage_chunks, stage_states, zero1_plan


def test_zero1_plan_by_hand():
    # backprop order: b (30) at 0..30, a (100) starts at the next 64 -> 64..164; the end is padded
    # to lcm(2, 128) = 256; equal shards [0, 128) and [128, 256)
    plan = zero1_plan([ParamSpec("a", 100), ParamSpec("b", 30)], 2)
    assert plan.param_range == {"b": (0, 30), "a": (64, 164)}
    assert plan.numel == 256 and plan.shard_bounds == [(0, 128), (128, 256)]
    assert plan.padding == 256 - 130
    flat = zero1_plan([ParamSpec("a", 100), ParamSpec("b", 30)], 2, pad=False)
    assert flat.numel == 130 and flat.shard_bounds == [(0, 130)]


@pytest.mark.parametrize("overrides,world", [
    ([], 1),
    (["parallel.tp=2", "parallel.sp=true"], 2),
    (["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.sp=true"], 8),
])
def test_local_numels_sum_to_the_stage_counts(overrides, world):
    cfg = load_config("k2-tiny", overrides)
    layout = resolve_layout(cfg, world)
    counts = stage_parameters(cfg, layout)
    for r in range(layout.pp):
        chunks = stage_chunks(cfg, layout, r)
        dense = sum(s.numel for c in chunks for s in c.dense)
        expert = [sum(s.numel for c in chunks if c.experts for s in c.experts[e])
                  for e in range(layout.ep)] if layout.ep > 1 else [0]
        assert dense + expert[0] == counts[r]
        assert len(set(expert)) == 1  # uniform expert split over EP ranks


def test_adamw_state_at_one_rank_by_hand():
    """k2-tiny, 1 rank, fp32: params are their own master; Adam's two moments per element;
    buffer = megatron's padded layout of every parameter."""
    cfg = load_config("k2-tiny", ["train.dtype=fp32"])
    layout = resolve_layout(cfg, 1)
    (st,) = stage_states(cfg, layout, 0, device="cpu")
    n = sum(math.prod(s) for s in megatron_param_shapes(cfg.model).values())
    assert st.params == n and st.optimizer_shard == n
    assert st.optimizer_bytes == 8 * n
    buffer = st.grad_bytes // 4
    assert st.param_bytes == 4 * buffer and buffer % 128 == 0 and 0 <= buffer - n < 64 * 100


def test_kimi_k2_preset_state_per_rank():
    """The issue's figures: 256 ranks in the preset layout (PP16 x VPP2, EP16, DP16,
    expert-DP 1): 4.82B parameters on the heaviest pipeline rank, 4.70B on average; bf16
    weights 9.6 GB + fp32 gradient buffers 19.3 GB there, about 28 GB on average; about 34 GB
    of unsharded MuonClip state; with AdamW over 75 GB before activations."""
    cfg = load_config("kimi-k2")
    layout = resolve_layout(cfg, 256)
    heavy = [max(stage_states(cfg, layout, r), key=lambda s: s.total) for r in (0, 1, 15)]
    assert [s.params for s in heavy] == [4081696768, 4819582976, 3584203776]
    counts = stage_parameters(cfg, layout)
    assert abs(sum(counts) / len(counts) / 1e9 - 4.70) < 0.005
    mid = heavy[1]
    assert round(mid.param_bytes / 1e9, 1) == 9.6 and round(mid.grad_bytes / 1e9, 1) == 19.3
    assert 33e9 < mid.optimizer_bytes < 35e9  # master + momentum, experts unsharded
    mean = sum(c * 6 for c in counts) / len(counts)  # 2 bytes bf16 + 4 bytes fp32 grads
    assert 27.5e9 < mean < 28.5e9
    adam = load_config("kimi-k2", ["optimizer.name=adamw"])
    (worst,) = [max(stage_states(adam, layout, 1), key=lambda s: s.total)]
    assert worst.total > 75e9
