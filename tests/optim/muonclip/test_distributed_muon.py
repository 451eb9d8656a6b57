"""The pieces of the distributed MuonClip (k2mcore.optim.muonclip.sharded) on one process.

The multi-rank behaviour (layout-independent updates, Newton-Schulz once per matrix, QK-Clip on
master shards) is tested in tests/parity/test_muonclip_parity.py and the resume in
tests/training/test_trainer.py.
"""
from __future__ import annotations

import pytest
import torch

from k2mcore.config.loader import load_config
from k2mcore.errors import ConfigError
from k2mcore.optim.muonclip.muon import MuonClip
from k2mcore.optim.muonclip.sharded import (
    MuonHyperParams,
    ShardedMuonClip,
    _Matrix,
    _Piece,
    balance,
    build_plan,
    is_state_placeholder,
)
from k2mcore.parallel.layout import resolve_layout


def _megatron_shards(full: torch.Tensor, tp: int, dim: int, gated: bool) -> list[torch.Tensor]:
    """How megatron splits a weight over TP: fused SwiGLU fc1 [gate; up] keeps a gate half and
    an up half in every shard (its sharded_state_dict's swiglu factory does the same)."""
    if gated:
        gate, up = full.chunk(2, dim=0)
        return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]
    return list(full.chunk(tp, dim=dim))


@pytest.mark.parametrize("dim,gated", [(0, False), (1, False), (0, True)])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_assemble_and_split_invert_megatron_tp_sharding(tp, dim, gated):
    full = torch.randn(16, 8)
    shards = _megatron_shards(full, tp, dim, gated)
    m = _Matrix("w", tuple(shards[0].shape), tp, dim, 2 if gated else 1)
    assert m.full_shape == tuple(full.shape)
    assert torch.equal(m.assemble(torch.stack(shards)), full)
    assert torch.equal(m.split(full), torch.stack(shards))


def test_cost_counts_gate_and_up_blocks_apart():
    from k2mcore.optim.muonclip.newton_schulz import ns_flops

    assert _Matrix("fc1", (64, 32), 2, 0, 2).cost == 2 * ns_flops(64, 32)  # full [128, 32]
    assert _Matrix("proj", (32, 48), 2, 1, 1).cost == ns_flops(32, 96)


def test_balance_is_longest_job_first_and_deterministic():
    costs = [5, 9, 1, 9, 3, 4]
    owner = balance(costs, 3)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(3)]
    # by hand: 9 -> r0, 9 -> r1, 5 -> r2, 4 -> r2 (9), 3 -> r0 (ties go to the lower rank), 1 -> r1
    assert owner == [2, 0, 1, 1, 0, 2] and loads == [12, 10, 9]
    assert max(loads) <= 4 / 3 * 11  # LPT's bound against the optimum (10/10/11)
    assert balance([7], 4) == [0] and balance([], 2) == []


def _one_process_optimizer(muon_ws, adam_ws, lr, wd, **hparams):
    """ShardedMuonClip over full tensors with a 1-rank plan (the DistributedOptimizer at DP=1
    hands its inner optimizer exactly this: each main param is the whole flattened tensor)."""
    flat = [torch.nn.Parameter(w.clone().view(-1)) for w in muon_ws + adam_ws]
    adamw = torch.optim.AdamW([{"params": flat, "lr": lr, "weight_decay": wd}], lr=lr,
                              betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    matrices = [_Matrix(f"w{i}", tuple(w.shape), 1, 0, 1) for i, w in enumerate(muon_ws)]
    pieces = [_Piece(0, 0, w.numel(), True) for w in muon_ws]
    plan = build_plan(matrices, pieces, None)
    opt = ShardedMuonClip.from_inner(adamw, plan=plan, muon=[(flat[i], i) for i in range(len(muon_ws))],
                                     hparams=MuonHyperParams(**hparams))
    return opt, flat


@pytest.mark.parametrize("muon_lr_scale,muon_wd", [(1.0, None), (0.5, 0.02)])
def test_one_rank_equals_muonclip_and_adamw(muon_lr_scale, muon_wd):
    """Muon's own lr scale and weight decay (optimizer.muon.*) apply to the matrices only."""
    g = torch.Generator().manual_seed(0)
    muon_ws = [torch.randn(24, 40, generator=g), torch.randn(40, 24, generator=g)]
    adam_ws = [torch.randn(40, generator=g)]
    lr, wd = 0.01, 0.1
    opt, flat = _one_process_optimizer(muon_ws, adam_ws, lr, wd, lr_scale=muon_lr_scale,
                                       weight_decay=muon_wd)
    ref_muon = [torch.nn.Parameter(w.clone()) for w in muon_ws]
    ref_adam = [torch.nn.Parameter(w.clone()) for w in adam_ws]
    muon = MuonClip(ref_muon, lr=lr * muon_lr_scale, weight_decay=wd if muon_wd is None else muon_wd)
    adam = torch.optim.AdamW(ref_adam, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    for _ in range(4):
        grads = [torch.randn(w.shape, generator=g) for w in muon_ws + adam_ws]
        for p, gr in zip(flat, grads):
            p.grad = gr.view(-1).clone()
        for p, gr in zip(ref_muon + ref_adam, grads):
            p.grad = gr.clone()
        opt.step(), muon.step(), adam.step()
    for p, ref in zip(flat, ref_muon + ref_adam):
        torch.testing.assert_close(p.detach().view_as(ref), ref.detach(), rtol=0, atol=1e-6)
    assert all((p.detach().view_as(w) - w).abs().max() > 1e-3 for p, w in zip(flat, muon_ws))


def test_muon_shards_keep_one_moment_and_a_free_placeholder():
    opt, flat = _one_process_optimizer([torch.randn(8, 4)], [torch.randn(4)], 0.01, 0.0)
    opt.init_state()
    muon_state, adam_state = opt.state[flat[0]], opt.state[flat[1]]
    assert is_state_placeholder(muon_state["exp_avg_sq"]) and muon_state["exp_avg_sq"].shape == flat[0].shape
    assert muon_state["exp_avg_sq"].untyped_storage().nbytes() == 4  # one float, not 32
    assert not is_state_placeholder(adam_state["exp_avg_sq"]) and not is_state_placeholder(muon_state["exp_avg"])


def test_takes_over_another_adam_and_refuses_a_stepped_optimizer():
    """TE's FusedAdam stands in megatron's place on GPU: its groups (lr, betas, eps, wd) carry
    over to a torch AdamW, and stepping matches torch's AdamW on the same groups."""
    w = torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(1)))
    other = torch.optim.Adam([{"params": [w], "lr": 0.1, "weight_decay": 0.01}], lr=0.1,
                             betas=(0.8, 0.9), eps=1e-6)
    opt = ShardedMuonClip.from_inner(other, plan=build_plan([], [], None), muon=[],
                                     hparams=MuonHyperParams())
    ref_w = torch.nn.Parameter(w.detach().clone())
    ref = torch.optim.AdamW([ref_w], lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.01)
    for _ in range(3):
        w.grad = ref_w.grad = torch.ones(6)
        opt.step(), ref.step()
    assert torch.equal(w, ref_w) and opt.param_groups[0] is other.param_groups[0]
    with pytest.raises(TypeError, match="has not stepped"):
        ShardedMuonClip.from_inner(ref, plan=None, muon=[], hparams=MuonHyperParams())


@pytest.mark.parametrize("sets,needle", [
    (["qk_clip.threshold=0"], "qk_clip.threshold: must be > 0, got 0.0"),
    (["qk_clip.threshold=-5"], "qk_clip.threshold: must be > 0, got -5.0"),
    (["optimizer.muon.coefficients=quartic"],
     "optimizer.muon.coefficients: 'quartic' is not one of k2, muon"),
    (["optimizer.muon.momentum=1.0"], "optimizer.muon.momentum: must be in [0, 1), got 1.0"),
    (["optimizer.muon.ns_steps=0"], "optimizer.muon.ns_steps: must be >= 1, got 0"),
    (["optimizer.muon.lr_scale=-1"], "optimizer.muon.lr_scale: must be >= 0, got -1.0"),
    (["optimizer.muon.weight_decay=-0.1"], "optimizer.muon.weight_decay: must be >= 0 or null, got -0.1"),
    (["optimizer.muon.ns_dtype=fp16"], "optimizer.muon.ns_dtype: 'fp16' is not one of auto, fp32, bf16"),
    (["optimizer.muon.ns_offload_budget=0.9"],
     "optimizer.muon.ns_offload_budget: must be in [0, 0.5] (a fraction of ZeRO-1's bytes), got 0.9"),
    (["optimizer.name=muonclip", "parallel.distributed_optimizer=false"],
     "optimizer.name=muonclip needs parallel.distributed_optimizer=true"),
])
def test_bad_muonclip_config_is_one_line_before_any_process_group(sets, needle):
    cfg = load_config("k2-tiny", sets)
    with pytest.raises(ConfigError) as info:
        resolve_layout(cfg, 1)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_config_knows_every_coefficient_set():
    from k2mcore.config.validate import CHOICES
    from k2mcore.optim.muonclip.newton_schulz import NS_COEFFICIENTS

    assert set(CHOICES["optimizer.muon.coefficients"]) == set(NS_COEFFICIENTS)
