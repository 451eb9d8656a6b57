"""The RL policy update (k2mcore.rl) in every layout equals the 1-rank update; the layouts'
old log-probabilities equal transformers' on the exported weights; the loss does not depend on
the micro-batch split. The runs: rl_probe.py, inside the shared launches (conftest.py)."""
from __future__ import annotations

import pytest
from rl_probe import LAYOUT_LOSSES, LOSSES, MINIBATCHES, ROLLOUT_GLOBAL_BATCH, RUNS, rollouts
from test_layout_parity import GRAD_RTOL, _worst_grad

from harness.hf_models import hf_logprobs, hf_model_from_full

# the losses are sums of terms of order 1 that cancel (advantages are zero-mean per group), so
# they are compared to an absolute tolerance at fp32's scale of those terms
LOSS_ATOL = 2e-6
WEIGHT_RTOL = 1e-4  # of each tensor's largest |weight change|, after two AdamW steps


def _cases():
    return [(name, loss) for name in RUNS if name != "1rank"
            for loss in LAYOUT_LOSSES.get(name, LOSSES[:1])]


@pytest.mark.parametrize("layout,loss", _cases())
def test_rl_update_matches_one_rank(rl_results, init_weights, layout, loss):
    """Two minibatches (two AdamW steps) of one rollout batch: the same losses, metrics,
    second-step gradients and final weights as 1 rank."""
    ref, got = rl_results["1rank"][loss], rl_results[layout][loss]
    for a, b in zip(ref["rows"], got["rows"]):
        assert a["ok"] and b["ok"]
        assert abs(a["loss"] - b["loss"]) <= LOSS_ATOL, (a["loss"], b["loss"])
        for key in ("clip_frac", "dropped_groups", "reward_mean", "adv_std"):
            assert b[key] == pytest.approx(a[key], abs=1e-9), key
        for key in ("ratio_mean", "ratio_max", "entropy", "tis_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    worst, key = _worst_grad(ref["grads"], got["grads"])
    assert worst <= GRAD_RTOL, f"{key}: {worst:.2e}"
    for name, want in ref["weights"].items():
        step = (want - init_weights[name]).abs().max().clamp_min(1e-12)
        diff = (got["weights"][name] - want).abs().max()
        assert diff <= WEIGHT_RTOL * step, f"{name}: {diff:.2e} of a {step:.2e} change"


@pytest.mark.parametrize("loss", LOSSES)
def test_second_minibatch_is_off_policy_and_clips(rl_results, loss):
    """The first minibatch runs at ratio 1 (old = current weights); the second, a step later,
    does not, and the clip range acts on it (grpo, gspo; k2 has no clipping)."""
    first, second = rl_results["1rank"][loss]["rows"]
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert first["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert first["clip_frac"] == 0.0
    assert abs(second["ratio_mean"] - 1.0) > 1e-4 or abs(second["ratio_max"] - 1.0) > 1e-4
    if loss != "k2":
        assert second["clip_frac"] > 0.0
    assert first["dropped_groups"] == 1  # group q1's rewards are all equal
    assert 0.0 < first["tis_mean"] < 2.0


@pytest.mark.parametrize("layout", ["1rank", "tp2-sp", "pp2-vpp2", "ep2", "cp2"])
def test_old_logprobs_equal_transformers(rl_results, init_weights, tmp_path, layout):
    """k2mcore.rl.logprobs in the layout (vocab-parallel log-softmax under TP, sent from the
    last stage under PP, experts over EP, gathered over CP) at temperature 0.9 against
    transformers' DeepseekV3 holding the same (exported) weights."""
    from k2mcore.config.loader import load_config

    model = hf_model_from_full(init_weights, load_config("k2-tiny").model, str(tmp_path))
    old = rl_results[layout]["grpo"]["old_logp"]
    data = rollouts(1024, 32)
    assert sorted(old) == list(range(ROLLOUT_GLOBAL_BATCH * MINIBATCHES))
    worst = 0.0
    for i, r in enumerate(data):
        ref = hf_logprobs(model, r.prompt + r.response, temperature=0.9)
        worst = max(worst, (old[i][:ref.numel()] - ref).abs().max().item())
    assert worst <= 2e-5, worst


@pytest.mark.parametrize("layout", ["1rank", "tp2-sp", "cp2"])
def test_packed_logprobs_equal_padded(rl_results, layout):
    """k2mcore.rl.logprobs on the 16 rollouts packed into fewer rows (THD; under CP each
    padded to 2·cp and split per document) equals one rollout per padded row."""
    assert rl_results[layout]["grpo"]["packed_diff"] <= 2e-5


def test_loss_and_gradients_do_not_depend_on_the_micro_batch_split(rl_results):
    """The first minibatch (8 rollouts of very different lengths, an old policy off by a
    token-dependent shift) in 8, 4 and 2 micro-batches: the same loss, metrics and gradients."""
    split = dict(rl_results["1rank"]["grpo"]["split"])
    # and the expert-bias update counts training forwards only, not the old-logprob pass
    assert split.pop("counted_by_old_pass") == 0.0
    loss, metrics, grads = split[1]
    assert metrics["clip_frac"] > 0
    for mbs in (2, 4):
        value, m, g = split[mbs]
        assert abs(value - loss) <= LOSS_ATOL, (mbs, value, loss)
        assert m["clip_frac"] == metrics["clip_frac"]
        worst, key = _worst_grad(grads, g)
        assert worst <= GRAD_RTOL, (mbs, key, worst)
