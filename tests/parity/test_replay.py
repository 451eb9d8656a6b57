"""Routing replay (R3 from the rollouts' routes, R2 from the old-logprob pass), the KL term to a
reference policy and the entropy bonus, in every layout. The runs: replay_probe.py, inside the
shared launches (conftest.py)."""
from __future__ import annotations

import pytest
from replay_probe import R2_RUNS, R3_RUNS, REFERENCE_RUNS
from test_layout_parity import GRAD_RTOL, _worst_grad
from test_rl_parity import LOSS_ATOL, WEIGHT_RTOL


@pytest.mark.parametrize("layout", R3_RUNS)
def test_replayed_forwards_use_exactly_the_rollout_routes(replay_results, layout):
    """Every router output (the token dispatcher's input) of the old-logprob pass and of both
    minibatches, forwards and recomputes, routes each token to its rollout route's experts."""
    mismatch, checked = replay_results[layout]["r3"]["watch"]
    assert checked > 1000 and mismatch == 0, (mismatch, checked)


def test_replay_changes_the_forward_and_the_router_still_learns(replay_results, init_weights):
    """Random routes differ from the router's own for most tokens; the loss with the replay
    differs from the loss without; the routers' gradients are not zero (the gate weights are
    the router's scores at the replayed experts)."""
    r3 = replay_results["1rank"]["r3"]
    assert r3["rows"][0]["replay_changed"] > 0.5
    assert abs(r3["first_loss"]["replay"] - r3["first_loss"]["none"]) > 1e-4
    routers = [k for k in r3["grads"] if k.endswith("router.weight")]
    assert routers and all(r3["grads"][k].abs().max() > 0 for k in routers)


@pytest.mark.parametrize("layout", [n for n in R3_RUNS if n != "1rank"])
def test_replay_kl_and_entropy_update_matches_one_rank(replay_results, init_weights, layout):
    """R3 with rl.kl_coef (the rollouts' ref_logprobs) and rl.entropy_coef: the same losses,
    KL, entropy, replay share, second-step gradients and final weights as 1 rank."""
    ref, got = replay_results["1rank"]["r3"], replay_results[layout]["r3"]
    for a, b in zip(ref["rows"], got["rows"]):
        assert abs(a["loss"] - b["loss"]) <= LOSS_ATOL, (a["loss"], b["loss"])
        # the KL is a mean of small differences of log-probabilities of order 7: fp32's
        # absolute noise, not its relative one
        for key in ("kl", "entropy"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
        for key in ("ratio_mean", "ratio_max"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert b["replay_changed"] == pytest.approx(a["replay_changed"], abs=1e-12)
    assert ref["rows"][1]["kl"] > 0
    worst, key = _worst_grad(ref["grads"], got["grads"])
    assert worst <= GRAD_RTOL, f"{key}: {worst:.2e}"
    for name, want in ref["weights"].items():
        step = (want - init_weights[name]).abs().max().clamp_min(1e-12)
        assert (got["weights"][name] - want).abs().max() <= WEIGHT_RTOL * step, name


@pytest.mark.parametrize("layout", list(R2_RUNS))
def test_r2_minibatches_use_the_old_pass_experts(replay_results, layout):
    """R2: in both minibatches (the second after a step, when the router would choose
    otherwise), every forward and every recomputed forward of a micro-batch routes its tokens
    exactly as the old-logprob pass did (full recompute at 1 rank, PP2 x VPP2 and CP2, K2's
    selective set at TP2+SP)."""
    r2 = replay_results[layout]["r2"]
    mismatch, checked, recomputed, recorded = r2["watch"]
    assert recorded > 0 and checked >= recorded and mismatch == 0, r2["watch"]
    assert recomputed > 0  # the recomputed routers replayed too
    assert r2["rows"][1]["replay_changed"] > 0  # the stepped router disagrees with the old one


@pytest.mark.parametrize("layout", REFERENCE_RUNS)
def test_reference_beside_a_replaying_policy(replay_results, rl_results, layout):
    """The reference policy, loaded from a checkpoint of the initial weights beside a policy
    that replays the rollouts' routes, routes tokens itself: its log-probabilities are those of
    the plain initial model (the grpo run's old pass), while the policy's, from the same
    weights, are the replayed ones, and every replayed router output follows the routes."""
    ref_run = replay_results[layout]["reference"]
    plain = rl_results[layout]["grpo"]["old_logp"] if layout in rl_results else \
        rl_results["1rank"]["grpo"]["old_logp"]
    worst_ref = max((ref_run["ref_logp"][i] - plain[i]).abs().max().item() for i in plain)
    worst_old = max((ref_run["old_logp"][i] - plain[i]).abs().max().item() for i in plain)
    assert worst_ref <= 2e-6, worst_ref
    assert worst_old > 1e-3, worst_old
    mismatch, checked = ref_run["watch"]
    assert checked > 0 and mismatch == 0
