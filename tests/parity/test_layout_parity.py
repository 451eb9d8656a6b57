"""Every parallel layout gives the 1-rank loss and gradients (fp32, gathered to full shape).

The launches are shared with test_muonclip_parity.py (conftest.py's `results`).
"""
from __future__ import annotations

import pytest
import torch

from layout_worker import EIGHT_RANK, FOUR_RANK, TWO_RANK

LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5  # of the tensor's largest |grad|: fp32 reductions in another order


@pytest.mark.parametrize("layout", TWO_RANK + EIGHT_RANK + FOUR_RANK)
def test_layout_matches_one_rank(results, layout):
    ref, got = results["1rank"], results[layout]
    assert abs(got["loss"] - ref["loss"]) <= LOSS_RTOL * abs(ref["loss"]), (got["loss"], ref["loss"])
    assert set(got["grads"]) == set(ref["grads"])
    worst, worst_key = 0.0, None
    for key, want in ref["grads"].items():
        have = got["grads"][key]
        assert have.shape == want.shape, key
        assert not torch.isnan(have).any(), f"{key}: part of the tensor was never gathered"
        rel = ((have - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        if rel > worst:
            worst, worst_key = rel, key
    print(f"{layout}: loss {got['loss']:.8f} (1 rank {ref['loss']:.8f}), "
          f"worst grad diff {worst:.1e} of max |grad| at {worst_key}")
    assert worst <= GRAD_RTOL, f"{worst_key}: {worst:.2e}"


@pytest.mark.parametrize("layout", ["1rank"] + TWO_RANK + EIGHT_RANK + FOUR_RANK)
def test_parameters_per_rank_match_the_plan(results, layout):
    """What each rank of the real build holds equals k2m-train --check's analytic count."""
    got = results[layout]
    for pp_rank, held in got["param_counts"]:
        assert held == got["expected_counts"][pp_rank], (pp_rank, held, got["expected_counts"])


@pytest.mark.parametrize("layout", TWO_RANK + EIGHT_RANK + FOUR_RANK)
def test_fresh_weights_do_not_depend_on_the_layout(results, layout):
    """train.init=layout_invariant: every layout builds exactly the 1-rank initial weights."""
    ref, got = results["1rank"]["fresh_weights"], results[layout]["fresh_weights"]
    assert set(got) == set(ref)
    for key, want in ref.items():
        assert torch.equal(got[key], want), key


def test_reference_gradients_are_not_trivial(results):
    """Guards the comparison itself: every parameter gets a gradient in the reference."""
    for key, grad in results["1rank"]["grads"].items():
        assert grad.abs().max() > 0, key
