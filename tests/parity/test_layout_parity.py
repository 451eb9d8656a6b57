"""Every parallel layout gives the 1-rank loss and gradients (fp32, gathered to full shape).

The launches are shared with test_muonclip_parity.py (conftest.py's `results`).
"""
from __future__ import annotations

import pytest
import torch

from layout_worker import EIGHT_RANK, FOUR_RANK, SFT_SPANS, TWO_RANK

LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5  # of the tensor's largest |grad|: fp32 reductions in another order


def _worst_grad(ref: dict, got: dict) -> tuple[float, str]:
    assert set(got) == set(ref)
    worst, worst_key = 0.0, None
    for key, want in ref.items():
        have = got[key]
        assert have.shape == want.shape, key
        rel = ((have - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        if rel > worst:
            worst, worst_key = rel, key
    return worst, worst_key


@pytest.mark.parametrize("layout", TWO_RANK + EIGHT_RANK + FOUR_RANK)
def test_sft_masked_loss_and_gradients_match_one_rank(results, layout):
    """Uneven loss masks (SFT_SPANS: 3, 29, 8 and 2 tokens): the per-token mean over the
    global batch, whichever ranks and micro-batches hold which sequences."""
    (ref_loss, ref_grads), (loss, grads) = results["1rank"]["sft"][1], results[layout]["sft"][1]
    assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), (loss, ref_loss)
    worst, key = _worst_grad(ref_grads, grads)
    assert worst <= GRAD_RTOL, f"{key}: {worst:.2e}"


def test_sft_loss_is_the_per_token_mean_whatever_the_micro_batch_split(results):
    """The 1-rank global batch in 4, 2 and 1 micro-batches: the same loss and gradients. With
    spans this uneven a mean of micro-batch means would differ between the splits."""
    split = results["1rank"]["sft"]
    loss, grads = split[1]
    for mbs in (2, 4):
        assert abs(split[mbs][0] - loss) <= LOSS_RTOL * abs(loss), (mbs, split[mbs][0], loss)
        worst, key = _worst_grad(grads, split[mbs][1])
        assert worst <= GRAD_RTOL, (mbs, key, worst)
    sizes = [b - a for a, b in SFT_SPANS]
    assert max(sizes) > 10 * min(sizes)  # uneven enough for the normalisation to matter


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
