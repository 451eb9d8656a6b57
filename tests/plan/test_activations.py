"""The activation planner (k2mcore/plan/activations.py): hand-computed saved bytes for k2-tiny,
and the schedules' in-flight micro-batch counts against megatron-core 0.19.2's formulas.
Pure python and fast; the measured check is tests/parity/activation_probe.py."""
from __future__ import annotations

import ast
import time

import pytest

from k2mcore.config.loader import load_config
from k2mcore.parallel.layout import resolve_layout
from k2mcore.plan.activations import activation_bytes, chunk_layers, schedule_in_flight

TINY = ["train.seq_length=32", "train.dtype=fp32", "train.global_batch_size=4"]


def tiny(*extra: str):
    return load_config("k2-tiny", TINY + list(extra))


# k2-tiny at b=1, s=32 (T = 32 tokens), fp32 (d = 4): h=64, 4 heads, q/k head 16+8=24, v 16,
# q_lora 32, kv_lora 32, rope 8, dense ffn 128, expert ffn 32 (1 shared), 8 experts, top-2,
# vocab 1024. Local attention (SDPA's CPU math path), no probe, no recompute.
#
# attention block of one layer:
#   input norm: x (the layer input) T*h*4 = 8192, rsqrt T*4 = 128, x_hat 8192     16512
#   its output, saved by q_down / kv_down (F.linear)                               8192
#   q latent: x = q_down output T*32*4 = 4096, rsqrt 128, x_hat 4096; q_up input 4096  12416
#   kv latent: x is a view of kv_down's [T, 32+8] output = 5120, rsqrt 128,
#              x_hat 4096; kv_up input 4096                                       13440
#   rope cos/sin [s,1,1,8] for q and k: 4 * 32*8*4                                 4096
#   SDPA: q*scale, k*scale [1,4,32,24] 2*12288, v (a view of value) 8192,
#         probabilities [1,4,32,32] 16384                                         49152
#   linear_proj input [T, 4*16]                                                    8192
#                                                                         sum    112000
# dense MLP: pre-MLP norm 16512, fc1 input 8192, SwiGLU 5*T*128*4 = 81920          106624
# MoE MLP: norm 16512, shared fc1 input 8192, shared SwiGLU 5*T*32*4 = 20480,
#   router: scores T*8*4 = 1024, T*4 = 128, T*2*4 = 256, top-k ids T*2*8 = 512,
#   permute: argsort ids 8*T*8 = 2048, sorted ids 512,
#   experts on T*2 = 64 tokens: input 64*64*4 = 16384, SwiGLU 5*64*32*4 = 40960,
#   probs 64*4 = 256, glu output saved by * probs 64*32*4 = 8192                  115456
# embedding: ids T*8 = 256; loss: final norm 16512, output layer input 8192,
#   exp_logits T*1024*4 = 131072, target mask 32, target ids 256, token loss 128  156192
DENSE_LAYER = 112000 + 106624
MOE_LAYER = 112000 + 115456
TINY_TOTAL = 256 + DENSE_LAYER + 3 * MOE_LAYER + 156192


def test_one_layer_by_hand():
    cfg = tiny()
    layout = resolve_layout(cfg, 1)
    layers, pre, post = chunk_layers(cfg, layout, 0, 0, attention="local", dtype_bytes=4)
    assert [l.kept for l in layers] == [DENSE_LAYER, MOE_LAYER, MOE_LAYER, MOE_LAYER]
    assert (pre, post) == (256, 156192)
    [stage] = activation_bytes(cfg, layout, attention="local", dtype_bytes=4)
    assert stage.per_chunk == [TINY_TOTAL] and stage.in_flight == [1]
    assert stage.transient == 0 and stage.total == TINY_TOTAL


def test_full_recompute_keeps_inputs_and_reruns_one_layer():
    cfg = tiny("train.recompute=full")
    [stage] = activation_bytes(cfg, resolve_layout(cfg, 1), attention="local", dtype_bytes=4)
    # forward: each layer's input (T*h*4) only, plus embedding and loss
    assert stage.per_chunk == [256 + 4 * 8192 + 156192]
    # backward of the last (MoE) layer re-saves all of it but its input; the loss is freed
    assert stage.transient == MOE_LAYER - 8192 - 156192
    assert stage.total == stage.per_chunk[0] + stage.transient


def test_probe_adds_the_mask():
    base = activation_bytes(tiny(), resolve_layout(tiny(), 1), attention="local",
                            dtype_bytes=4)[0].total
    probe = tiny("model.measure_max_attn_logit=true")
    on = activation_bytes(probe, resolve_layout(probe, 1), attention="local", dtype_bytes=4)
    assert on[0].total - base == 4 * 32 * 32  # the [s, s] bool ~mask, one per layer (fp32)


def test_fused_has_no_s_squared_term():
    a = tiny("train.seq_length=64")
    b = tiny("train.seq_length=128")
    pa = activation_bytes(a, resolve_layout(a, 1), attention="fused")[0]
    pb = activation_bytes(b, resolve_layout(b, 1), attention="fused")[0]
    # everything is linear in s with fused attention (the loss too)
    assert pb.total == 2 * pa.total


def megatron_warmup_1f1b(pp, rank, m):
    return min(pp - rank - 1, m)  # forward_backward_pipelining_without_interleaving


def megatron_warmup_interleaved(pp, rank, m, vpp, group=None):
    group = group or pp  # microbatch_group_size_per_vp_stage default
    return min((pp - rank - 1) * 2 + (vpp - 1) * group, m * vpp)  # get_pp_rank_microbatches


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 2), (8, 16)])
def test_1f1b_in_flight(pp, m):
    for rank in range(pp):
        alive, _ = schedule_in_flight(pp, None, m, rank)
        assert alive == [min(megatron_warmup_1f1b(pp, rank, m) + 1, m)]


@pytest.mark.parametrize("pp,vpp,m", [(2, 2, 4), (4, 2, 8), (4, 4, 16), (2, 3, 6)])
def test_interleaved_in_flight(pp, vpp, m):
    for rank in range(pp):
        alive, _ = schedule_in_flight(pp, vpp, m, rank)
        # equal weights: the peak is the end of warmup plus the first steady-state forward
        assert sum(alive) == min(megatron_warmup_interleaved(pp, rank, m, vpp) + 1, m * vpp)


def test_interleaved_pp2_vpp2_by_chunk():
    # M=4, group 2: forwards (0,c0) (1,c0) (0,c1) (1,c1) (2,c0) (3,c0) (2,c1) (3,c1); rank 0
    # warms up 4, then forward (2,c0) before backward (0,c1): c0 holds 3, c1 holds 2
    assert schedule_in_flight(2, 2, 4, 0) == ([3, 2], 0)
    # rank 1 warms up 2 ((0,c0) (1,c0)), then (0,c1): [2, 1]; later (2,c0) -> [3, 0]
    assert schedule_in_flight(2, 2, 4, 1, weights=[1, 10])[0] == [2, 1]
    assert schedule_in_flight(2, 2, 4, 1, weights=[10, 1])[0] == [3, 0]


def test_no_pipelining_one_at_a_time():
    cfg = tiny()
    layout = resolve_layout(cfg, 2)  # dp2: 2 micro-batches per rank, still one at a time
    [stage] = activation_bytes(cfg, layout, attention="local", dtype_bytes=4)
    assert stage.in_flight == [1] and stage.total == TINY_TOTAL


def test_no_torch_or_megatron_import():
    import k2mcore.plan.activations as mod

    tree = ast.parse(open(mod.__file__).read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom)}
    assert not names & {"torch", "megatron"}


def test_kimi_k2_in_milliseconds():
    cfg = load_config("kimi-k2", [])
    layout = resolve_layout(cfg, 1024)
    t = time.perf_counter()
    plan = activation_bytes(cfg, layout)
    assert time.perf_counter() - t < 0.5
    assert len(plan) == layout.pp and all(p.total > 0 for p in plan)
