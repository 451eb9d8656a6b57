"""k2mcore.plan.comm against hand-computed figures for k2-tiny (seq 32, micro-batch 1, global
batch 4, fp32 = 4 bytes), the setting tests/parity/comm_probe.py counts in real runs (the
figures below are also what those runs counted, tp and ep aside: tp's total is the counted one,
ep the uniform-routing figure, within 4% of the counts)."""
from __future__ import annotations

import subprocess
import sys
import time

from k2mcore.config.loader import load_config
from k2mcore.parallel.layout import resolve_layout
from k2mcore.plan import comm

A = 4  # fp32 activations and parameters
H, S = 64, 32


def setup(world: int, **par):
    over = [f"parallel.{k}={str(v).lower()}" for k, v in par.items()]
    cfg = load_config("k2-tiny", over + ["train.seq_length=32", "train.dtype=fp32",
                                         "train.global_batch_size=4", "train.micro_batch_size=1",
                                         "model.measure_max_attn_logit=true"])
    return cfg, resolve_layout(cfg, world)


def test_one_rank_hands_nothing():
    cfg, layout = setup(1)
    assert comm.comm_bytes(cfg, layout, dtype_bytes=A) == dict.fromkeys(comm.KINDS, 0)


def test_pipeline_sends_per_schedule():
    act = S * 1 * H * A  # one [s, b, h] activation or gradient
    cfg, layout = setup(2, pp=2)
    assert layout.num_microbatches == 4
    # 1F1B: stage 0 sends 4 activations, stage 1 4 gradients; + the (2,) fp64 loss total over
    # PP; the last stage broadcasts the token count (int32)
    assert comm.comm_bytes(cfg, layout, rank={"pp": 0}, dtype_bytes=A)["pp"] == 4 * act + 16
    assert comm.comm_bytes(cfg, layout, rank={"pp": 1}, dtype_bytes=A)["pp"] == 4 * act + 16 + 4
    # interleaved (2 chunks per rank): 3 of the 4 chunk ends send on each rank
    cfg, layout = setup(2, pp=2, vpp=2)
    assert comm.comm_bytes(cfg, layout, rank={"pp": 0}, dtype_bytes=A)["pp"] == 98320
    assert comm.comm_bytes(cfg, layout, rank={"pp": 1}, dtype_bytes=A)["pp"] == 98324
    # sequence parallelism sends the [s/tp, b, h] shard
    cfg, layout = setup(4, pp=2, tp=2, sp=True)
    got = comm.comm_bytes(cfg, layout, rank={"pp": 0}, dtype_bytes=A)["pp"]
    assert got == layout.num_microbatches * act // 2 + 16


def test_expert_all_to_alls_uniform():
    cfg, layout = setup(2, ep=2)
    assert (layout.dp, layout.num_microbatches) == (2, 2)
    rows = S * 2  # topk 2 copies of every token
    per_layer = 2 * (2 * A * rows * H + 4 * rows)  # tokens twice + fp32 probs, fwd and bwd
    meta = 8 * 8  # tokens per expert, int64
    want = (per_layer + meta) * 3 * 2  # 3 MoE layers x 2 micro-batches
    assert want == 396672
    assert comm.comm_bytes(cfg, layout, dtype_bytes=A)["ep"] == want


def test_data_parallel_buffers_and_small_ones():
    cfg, layout = setup(2)  # DP2
    buffers = [(387712, 193856, 2)]
    got = comm.comm_bytes(cfg, layout, dp_buffers=buffers, dtype_bytes=A)["dp"]
    rs, ag = 4 * 387712, A * 193856
    small = 4 + 4 + 4 * 3 * 8 + 16 + 4  # norm, flag, expert-bias counts, loss total, tokens
    assert got == rs + ag + small == 2326396
    # a 1-rank group counts nothing; steady state drops the cached flag
    assert comm.comm_bytes(cfg, layout, dp_buffers=[(100, 100, 1)], dtype_bytes=A,
                           first_step=False)["dp"] == small - 4
    # EP2: a dense and an expert optimizer; each buffer is all-gathered once (compat.param_sync),
    # the has_grad_norm_group flag is each optimizer's
    cfg, layout = setup(2, ep=2)
    got = comm.comm_bytes(cfg, layout, dp_buffers=[(240256, 120128, 2), (1000, 1000, 1)],
                          dtype_bytes=A)["dp"]
    assert got == 4 * 240256 + A * 120128 + 4 + 2 * 4 + 96 + 20 == 1441664


def test_tensor_parallel_sp():
    cfg, layout = setup(2, tp=2, sp=True)
    me = comm._coords(layout, None)
    # replicated weights' grads all-reduced over TP: 4 x (norms 64+64+32+32, q_down 2048,
    # kv_down 2560) + final norm 64 + 3 routers 512
    assert comm._sp_grad_numel(cfg, layout, me) == 4 * 4800 + 64 + 3 * 512 == 20800
    got = comm.comm_bytes(cfg, layout, dtype_bytes=A)
    assert got["tp"] == 1735952  # counted at tp2-sp
    assert got["ep"] == 768  # tokens-per-expert gather over TP x EP
    assert got["pp"] == 0


def test_optimizer_terms():
    cfg, layout = setup(2)
    assert comm.comm_bytes(cfg, layout, dtype_bytes=A)["optimizer"] == 8 * (4 + 1)  # report
    m = load_config("k2-tiny", ["train.seq_length=32", "train.dtype=fp32",
                                "train.global_batch_size=4", "train.micro_batch_size=1",
                                "optimizer.name=muonclip", "model.measure_max_attn_logit=true"])
    layout = resolve_layout(m, 2)
    # + QK-Clip's per-head maxima (4 layers x 4 heads, fp32) over DP; owner-aligned: silent
    assert comm.comm_bytes(m, layout, dtype_bytes=A)["optimizer"] == 40 + 64
    m2 = load_config("k2-tiny", ["train.seq_length=32", "train.dtype=fp32", "parallel.tp=2",
                                 "parallel.sp=true", "train.global_batch_size=4",
                                 "train.micro_batch_size=1", "optimizer.name=muonclip",
                                 "model.measure_max_attn_logit=true"])
    layout = resolve_layout(m2, 2)
    # Newton-Schulz exchanges at TP2 (counted)
    assert comm.comm_bytes(m2, layout, rank={"tp": 0}, dtype_bytes=A)["optimizer"] == 1144872
    assert comm.comm_bytes(m2, layout, rank={"tp": 1}, dtype_bytes=A)["optimizer"] == 978984
    assert comm.busiest(m2, layout, dtype_bytes=A)["optimizer"] == 1144872


def test_kimi_k2_in_milliseconds_without_torch():
    cfg = load_config("kimi-k2", [])
    layout = resolve_layout(cfg, 256)
    t = time.perf_counter()
    got = comm.comm_bytes(cfg, layout, rank={"pp": 1})
    assert time.perf_counter() - t < 0.05
    assert got["pp"] > 0 and got["ep"] > 0
    code = "import sys, k2mcore.plan.comm; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bus_bytes_by_hand():
    """NCCL-tests' bus bytes (docs/testing.md, 'Counting bytes'): a reduce-scatter and the
    matching all-gather move (d-1)/d of the buffer each, an all-reduce twice that, an all-to-all
    what goes to the other ranks, a broadcast its tensor on every rank."""
    cfg, layout = setup(2)  # DP2: every all-reduce's 2(d-1)/d is 1, the buffer's (d-1)/d a half
    got = comm.bus_bytes(cfg, layout, dp_buffers=[(387712, 193856, 2)], dtype_bytes=A)["dp"]
    assert got == 2 * (4 * 387712 / 2) + (4 + 4 + 96 + 16 + 4)
    cfg, layout = setup(4)  # DP4: 3/4 of the buffer each way, the small all-reduces 3/2
    got = comm.bus_bytes(cfg, layout, dp_buffers=[(400, 100, 4)], dtype_bytes=A)["dp"]
    assert got == 2 * 1600 * 3 / 4 + (4 + 4 + 96 + 16 + 4) * 3 / 2
    handed = comm.comm_bytes(cfg, layout, dp_buffers=[(400, 100, 4)], dtype_bytes=A)["dp"]
    assert handed == 1600 + 400 + (4 + 4 + 96 + 16 + 4)  # the whole input, the local shard
    # EP2: the all-to-alls keep half at home; the tokens-per-expert gather returns 2 x 64 bytes
    cfg, layout = setup(2, ep=2)
    rows = S * 2
    a2a = 2 * (2 * A * rows * H + 4 * rows)
    assert comm.bus_bytes(cfg, layout, dtype_bytes=A)["ep"] == (a2a / 2 + 64) * 3 * 2
    # PP2: sends as they are; the loss total's all-reduce 16; the token count's broadcast
    # reaches both stages (handed over by the last only)
    act = S * 1 * H * A
    cfg, layout = setup(2, pp=2)
    for pp in (0, 1):
        assert comm.bus_bytes(cfg, layout, rank={"pp": pp}, dtype_bytes=A)["pp"] == 4 * act + 20
    # bf16 parameters: the all-gather moves half the fp32 gradients' reduce-scatter
    cfg, layout = setup(2)
    bf16 = comm.bus_bytes(cfg, layout, dp_buffers=[(1000, 500, 2)], dtype_bytes=2)["dp"]
    assert bf16 == 4 * 1000 / 2 + 2 * 1000 / 2 + (4 + 4 + 96 + 16 + 4)


def test_context_parallel_latent_exchange_by_hand():
    """CP2 (2 ranks, DP1): per layer and micro-batch one all-gather of this rank's 16 tokens'
    latent and rope key (kv_lora_rank 32 + 8 values, fp32) and one reduce-scatter of the whole
    sequence's gradient of them; 4 layers, 4 micro-batches. The pipeline's and the MoE's token
    counts are halved."""
    cfg, layout = setup(2, cp=2)
    assert layout.cp == 2 and layout.num_microbatches == 4
    local = 16 * 40 * A
    handed = comm.comm_bytes(cfg, layout, dtype_bytes=A)
    bus = comm.bus_bytes(cfg, layout, dtype_bytes=A)
    assert handed["cp"] == 4 * 4 * (local + 2 * local)
    assert bus["cp"] == 4 * 4 * (local + local)  # (d - 1)/d of the gathered 2 x local, twice
    assert handed["tp"] == 0 and handed["pp"] == 0
    # k2-tiny at CP1 moves nothing over CP
    cfg1, layout1 = setup(1)
    assert comm.comm_bytes(cfg1, layout1, dtype_bytes=A)["cp"] == 0


def test_blockwise_tp_traffic_gathers_the_latent_once():
    """TP2+SP with CP2: MLA's kv up projection is not a column-parallel call (its weight is used
    per key block), so its input is gathered once and reduce-scattered once per layer, instead
    of gathered twice (forward, and again for the weight's gradient) and reduce-scattered."""
    plain_cfg, plain = setup(2, tp=2, sp=True)
    cfg, layout = setup(4, tp=2, sp=True, cp=2)
    per = 4 * 4  # layers x micro-batches
    kv = 32 * A  # kv_lora_rank, fp32
    tokens_plain, tokens_cp = 32, 16
    col_plain = per * (2 * tokens_plain // 2 * kv + tokens_plain * kv)  # 2 AG + RS handed
    col_cp = per * (tokens_cp // 2 * kv + tokens_cp * kv)  # 1 AG + RS handed
    rest_plain = comm.comm_bytes(plain_cfg, plain, dtype_bytes=A)["tp"] - col_plain
    rest_cp = comm.comm_bytes(cfg, layout, dtype_bytes=A)["tp"] - col_cp
    # everything else moves per token, half the tokens at CP2, but the fixed-size all-reduces:
    # the SP-marked weights' gradients (fp32) and the loss total (2 x fp64)
    fixed = comm._sp_grad_numel(plain_cfg, plain, comm._coords(plain, None)) * 4 + 16
    assert rest_cp - fixed == (rest_plain - fixed) / 2
