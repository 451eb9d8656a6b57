"""Every parallel layout gives the 1-rank loss and gradients (fp32, gathered to full shape).

Three launches: the 1-rank reference (which also fixes the initial weights), one 2-rank launch
running six layouts in turn, and one 8-rank launch (TP2 x PP2 x EP2 with DP2).
"""
from __future__ import annotations

import os

import pytest
import torch
from launching import launch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "layout_worker.py")
TWO_RANK = ["tp2-sp", "pp2", "pp2-vpp2", "pp2-uneven", "ep2", "dp2", "tp2-ep2"]
EIGHT_RANK = ["tp2-pp2-ep2"]
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5  # of the tensor's largest |grad|: fp32 reductions in another order


def _launch(out: str, layouts: list[str], nproc: int, *extra: str) -> None:
    launch(WORKER, ["--out", out, "--layouts", ",".join(layouts), *extra], nproc,
           what=" ".join(layouts))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("parity"))
    _launch(out, ["1rank"], 1, "--write-init")
    _launch(out, TWO_RANK, 2)
    _launch(out, EIGHT_RANK, 8)
    return {
        name: torch.load(os.path.join(out, f"{name}.pt"), weights_only=True)
        for name in ["1rank", *TWO_RANK, *EIGHT_RANK]
    }


@pytest.mark.parametrize("layout", TWO_RANK + EIGHT_RANK)
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


@pytest.mark.parametrize("layout", ["1rank"] + TWO_RANK + EIGHT_RANK)
def test_parameters_per_rank_match_the_plan(results, layout):
    """What each rank of the real build holds equals k2m-train --check's analytic count."""
    got = results[layout]
    for pp_rank, held in got["param_counts"]:
        assert held == got["expected_counts"][pp_rank], (pp_rank, held, got["expected_counts"])


@pytest.mark.parametrize("layout", TWO_RANK + EIGHT_RANK)
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
