"""Context parallelism at 4,096 tokens (cp_probe.py): what CP4 moves and saves for backward per
rank, against the 1-rank run without the blockwise path. Parity at short sequences is in
test_layout_parity.py and test_muonclip_parity.py (the CP layouts of layout_worker.py)."""
from __future__ import annotations

import pytest

from cp_probe import CP_SEQ


def test_cp4_matches_one_rank_at_4096_tokens(cp_probe_results):
    ref, got = cp_probe_results["1rank"]["loss"], cp_probe_results["cp4"]["loss"]
    assert got == pytest.approx(ref, rel=1e-6)


def test_cp_moves_the_latent_once_per_layer(cp_probe_results):
    """Per rank and layer, one all-gather of the latent and rope key (kv_lora_rank +
    qk_rope_head_dim values per token, fp32) in forward and one reduce-scatter of their
    gradient in backward, each (cp - 1)/cp of the sequence's in bus bytes; nothing else on
    the CP group."""
    res = cp_probe_results["cp4"]
    cp, layers, width = res["cp"], res["layers"], res["latent_width"]
    per_layer = (cp - 1) / cp * CP_SEQ * width * 4
    for rank in res["per_rank"]:
        ops = rank["cp_ops"]
        assert set(ops) == {"all_gather_into_tensor", "reduce_scatter_tensor"}, ops
        for op, (handed, moved, calls) in ops.items():
            assert calls == layers, (op, calls)
            assert moved == pytest.approx(layers * per_layer, rel=1e-12), (op, moved)
        # handed over: each rank's own tokens to the gather, the whole sequence's gradient to
        # the reduce-scatter
        assert ops["all_gather_into_tensor"][0] == layers * CP_SEQ // cp * width * 4
        assert ops["reduce_scatter_tensor"][0] == layers * CP_SEQ * width * 4
    assert cp_probe_results["1rank"]["per_rank"][0]["cp_ops"] == {}


def test_cp4_saves_at_most_035x_of_one_rank_for_backward(cp_probe_results):
    """Peak bytes saved for backward per rank (tests/harness/saved_bytes.py): CP4 with 512-token
    key blocks against the plain attention on 1 rank, which keeps the 4,096 x 4,096
    probabilities of every head."""
    ref = cp_probe_results["1rank"]["per_rank"][0]["saved_peak"]
    worst = max(r["saved_peak"] for r in cp_probe_results["cp4"]["per_rank"])
    assert worst <= 0.35 * ref, worst / ref
