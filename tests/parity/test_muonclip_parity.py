"""MuonClip's distributed update does not depend on the layout, Newton-Schulz runs once per
matrix, and QK-Clip changes exactly the intended rows, the same way in every TP layout.

Reference: the 1-rank run (where the exchange is local and the update is plain Muon on full
matrices, itself checked against torch.optim.Muon in tests/optim/muonclip/test_muon.py).
"""
from __future__ import annotations

import pytest
import torch
from layout_worker import (
    BYTE_LAYOUTS,
    CLIP_LAYOUTS,
    CLIP_TAU,
    FORCED_OFFLOAD_LAYOUT,
    LAYOUTS,
    MUON_STEPS,
    MUON_TAU,
    MUONCLIP,
)

from k2mcore.optim.muonclip.newton_schulz import ns_flops

LR = 3e-3  # the MuonClip phase's learning rate (layout_worker.run_muonclip)
NOPE, ROPE, V, HEADS = 16, 8, 16, 4  # k2-tiny's MLA head dims


def _is_muon(key: str, t: torch.Tensor) -> bool:
    return t.ndim >= 2 and not key.startswith(("embedding.", "output_layer."))


def test_reference_run_is_not_trivial(muonclip_results):
    ref = muonclip_results["1rank"]
    first, last = ref["weights"][0], ref["weights"][-1]
    assert all(not torch.equal(first[k], last[k]) for k in first if _is_muon(k, first[k]))
    assert ref["rows"][0]["clipped_heads"] == 4 * HEADS  # every head starts above MUON_TAU
    assert all(r["ok"] for r in ref["rows"]) and len(ref["rows"]) == MUON_STEPS


@pytest.mark.parametrize("layout", MUONCLIP[1:])
def test_weights_after_each_step_match_one_rank(muonclip_results, layout):
    """Muon matrices within 1e-4 of how far they moved; AdamW tensors within 1% of one step
    (Adam's m/sqrt(v) turns the sign of a near-zero gradient, which reduction order can flip,
    into a whole step, on a few output-layer rows)."""
    ref, got = muonclip_results["1rank"], muonclip_results[layout]
    for step, (want_w, have_w) in enumerate(zip(ref["weights"], got["weights"])):
        assert set(have_w) == set(want_w)
        for key, want in want_w.items():
            diff = (have_w[key] - want).abs().max().item()
            if _is_muon(key, want):
                moved = (ref["weights"][-1][key] - ref["weights"][0][key]).abs().max().item()
                assert diff <= 1e-4 * moved, (step, key, diff, moved)
            else:
                assert diff <= 1e-2 * LR, (step, key, diff)
    for want, have in zip(ref["rows"], got["rows"]):
        assert abs(have["loss"] - want["loss"]) <= 1e-6 * want["loss"]
        assert have["clipped_heads"] == want["clipped_heads"]
        assert have["max_attn_logit"] == pytest.approx(want["max_attn_logit"], rel=1e-5)


def _hand_count(weights: dict) -> int:
    """Newton-Schulz FLOPs of one step over the model's Muon matrices, from their full shapes."""
    total = 0
    for key, w in weights.items():
        if not _is_muon(key, w):
            continue
        blocks = 2 if key.endswith("linear_fc1.weight") else 1  # SwiGLU gate and up apart
        per_matrix = blocks * ns_flops(w.shape[-2] // blocks, w.shape[-1])
        total += per_matrix * (w.shape[0] if w.ndim == 3 else 1)  # experts: one per expert
    return total


@pytest.mark.parametrize("layout", MUONCLIP)
def test_newton_schulz_runs_once_per_matrix(muonclip_results, layout):
    flops = muonclip_results[layout]["ns_flops"]  # per rank
    total = _hand_count(muonclip_results["1rank"]["weights"][0])
    assert sum(flops) == total, f"redundancy factor {sum(flops) / total:.3f}"
    if layout in ("dp2", "tp2-sp"):  # one stage on two ranks: the work is split evenly
        assert max(flops) <= 1.02 * total / 2


@pytest.mark.parametrize("layout", MUONCLIP[1:])
def test_first_stage_runs_several_owner_aligned_buckets(muonclip_results, layout):
    """Every MuonClip run overlaps its data-parallel communication with BUCKET-sized buckets: the
    first stage's first chunk has several owner-aligned buckets in its dense buffer (the weights
    above match one rank's all the same), the other stages one per buffer."""
    for pp_rank, counts in muonclip_results[layout]["buckets"]:
        assert counts[0] >= 2 if pp_rank == 0 else set(counts) == {1}, (pp_rank, counts)


def test_forced_offloads_ran_both_ways(muonclip_results):
    """The layout whose weights above match one rank's with Newton-Schulz offloads did offload:
    each rank sent its neighbour a SwiGLU half and an expert matrix (layout_worker.force_offloads)."""
    assert muonclip_results[FORCED_OFFLOAD_LAYOUT]["offloaded"] == [2, 2]
    assert all(n == 0 for name in MUONCLIP if name != FORCED_OFFLOAD_LAYOUT
               for n in muonclip_results[name]["offloaded"])


@pytest.mark.parametrize("layout", MUONCLIP)
def test_owner_aligned_shards_need_no_exchange_without_tp(muonclip_results, layout):
    """Every Muon matrix lies whole in its owner's ZeRO-1 shard: without TP no piece moves, so
    MuonClip runs no all_to_all; a TP-split matrix still gathers its TP shards on one rank."""
    has_tp = LAYOUTS[layout].get("parallel.tp", 1) > 1
    assert muonclip_results[layout]["exchange_free"] is not has_tp


@pytest.mark.parametrize("layout", BYTE_LAYOUTS)
def test_muonclip_moves_zero1_adamws_bytes(byte_results, layout):
    """Bytes handed to torch.distributed collectives over a whole training step, summed over
    ranks: MuonClip within 2% of ZeRO-1 AdamW on the same model; its busiest rank within 25% of
    AdamW's per-rank mean."""
    muon, adam = byte_results[layout]["muonclip"], byte_results[layout]["adamw"]
    assert adam["total"] > 0
    assert muon["total"] <= 1.02 * adam["total"], (muon["total"] / adam["total"], muon, adam)
    busiest = max(b for b, _ in muon["per_rank"])
    assert busiest <= 1.25 * adam["total"] / len(adam["per_rank"]), (busiest, adam)
    def a2a(run: dict) -> int:  # the MoE token dispatch's, at EP > 1: the same for both
        return sum(ops.get("all_to_all_single", 0) for _, ops in run["per_rank"])

    assert a2a(muon) == a2a(adam)  # MuonClip adds no exchange of its own


@pytest.mark.parametrize("layout", BYTE_LAYOUTS)
def test_data_parallel_bytes_are_zero1s_minimum(byte_results, layout):
    """Summed over ranks, AdamW and MuonClip hand the DDP reduce-scatter exactly the buffers'
    fp32 gradients and the parameter all-gather exactly 1/d of the fp32 parameters, once per
    buffer (with EP2's dense and expert optimizers too). In bus bytes the all-gather equals the
    reduce-scatter, d - 1 over d of the buffer each, and MuonClip's equal AdamW's."""
    bus = {}
    for name in ("adamw", "muonclip"):
        run = byte_results[layout][name]
        for op in ("reduce_scatter_tensor", "all_gather_into_tensor"):
            counted = sum(d[op] for d in run["ddp"])
            minimum = sum(z[op] for z in run["zero1"])
            assert counted > 0 and counted == pytest.approx(minimum, rel=1e-9), (name, op)
        bus[name] = {op: sum(d[op] for d in run["ddp_bus"]) for op in run["ddp_bus"][0]}
        scatter, gather = bus[name]["reduce_scatter_tensor"], bus[name]["all_gather_into_tensor"]
        assert gather == pytest.approx(scatter, rel=1e-9), (name, gather / scatter)
        # d - 1 over d of what was handed to the reduce-scatter (each buffer's d: EP2's expert
        # buffers are data parallel over 2 ranks, the dense ones over 4)
        assert scatter < sum(d["reduce_scatter_tensor"] for d in run["ddp"])
    assert bus["muonclip"] == pytest.approx(bus["adamw"], rel=1e-9)
    muon, adam = (byte_results[layout][n]["bus_total"] for n in ("muonclip", "adamw"))
    assert muon <= 1.02 * adam, muon / adam


@pytest.mark.parametrize("layout", CLIP_LAYOUTS)
def test_qk_clip_scales_exactly_the_clipped_heads_rows(clip_results, layout):
    """lr 0: only QK-Clip changes weights. Per head: q no-RoPE rows and k no-RoPE rows by
    sqrt(gamma), q RoPE rows by gamma, value rows and everything else untouched."""
    res = clip_results[layout]
    before, after = res["weights"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("linear_q_up_proj.weight", "linear_kv_up_proj.weight"))
                           for k in changed), sorted(changed)
    clipped = 0
    for layer in range(4):
        prefix = f"decoder.layers.{layer}.self_attention."
        q0, q1 = (w[prefix + "linear_q_up_proj.weight"].view(HEADS, NOPE + ROPE, -1) for w in (before, after))
        k0, k1 = (w[prefix + "linear_kv_up_proj.weight"].view(HEADS, NOPE + V, -1) for w in (before, after))
        for h in range(HEADS):
            gamma = (q1[h, NOPE:].norm() / q0[h, NOPE:].norm()).item()
            if torch.equal(q0[h], q1[h]):
                assert torch.equal(k0[h], k1[h])
                continue
            clipped += 1
            assert gamma < 1
            torch.testing.assert_close(q1[h, NOPE:], q0[h, NOPE:] * gamma, rtol=1e-5, atol=0)
            torch.testing.assert_close(q1[h, :NOPE], q0[h, :NOPE] * gamma ** 0.5, rtol=1e-5, atol=0)
            torch.testing.assert_close(k1[h, :NOPE], k0[h, :NOPE] * gamma ** 0.5, rtol=1e-5, atol=0)
            assert torch.equal(k1[h, NOPE:], k0[h, NOPE:])  # value rows
    assert clipped == res["rows"][0]["clipped_heads"]
    assert 0 < clipped < 4 * HEADS  # CLIP_TAU sits inside the logits' range


@pytest.mark.parametrize("layout", CLIP_LAYOUTS)
def test_qk_clip_brings_logits_back_to_the_threshold(clip_results, layout):
    """Re-measured on the same batch: the first layer's clipped heads land on tau exactly (its
    inputs did not change); later layers see slightly different inputs, so within 1%."""
    res = clip_results[layout]
    heads = res["heads_after"]
    per_layer_before = res["rows"][0]["max_attn_logit_per_layer"]
    for number, logits in heads.items():
        assert logits.max().item() <= CLIP_TAU * 1.01, (number, logits)
        if per_layer_before[number - 1] > CLIP_TAU and number == 1:
            assert logits.max().item() == pytest.approx(CLIP_TAU, rel=1e-5)


@pytest.mark.parametrize("layout", CLIP_LAYOUTS[1:])
def test_qk_clip_is_the_same_in_every_layout(clip_results, layout):
    """TP splits the heads, CP the tokens whose logits are measured (the max over key blocks,
    then over DP x CP): the same heads clip by the same factors as on 1 rank."""
    ref, got = clip_results["1rank"], clip_results[layout]
    assert got["rows"][0]["clipped_heads"] == ref["rows"][0]["clipped_heads"]
    for key, want in ref["weights"][1].items():
        torch.testing.assert_close(got["weights"][1][key], want, rtol=0, atol=1e-6 * want.abs().max().item())
    for number, want in ref["heads_after"].items():
        torch.testing.assert_close(got["heads_after"][number], want, rtol=1e-5, atol=0)


def test_muon_tau_is_below_every_initial_layer_max(muonclip_results):
    """Guards the MuonClip phase: its threshold forces clipping from the first step."""
    assert min(muonclip_results["1rank"]["rows"][0]["max_attn_logit_per_layer"]) > MUON_TAU


@pytest.mark.parametrize("layout", MUONCLIP[1:])
def test_per_head_max_logits_after_the_steps_match_one_rank(muonclip_results, layout):
    """After the 5 clipped steps, every head's max logit on the last batch (measured per key
    block at CP, MAX-reduced over DP x CP and gathered over TP) equals 1 rank's."""
    ref, got = muonclip_results["1rank"]["heads_after"], muonclip_results[layout]["heads_after"]
    assert set(got) == set(ref)
    for number, want in ref.items():
        torch.testing.assert_close(got[number], want, rtol=1e-5, atol=0)
