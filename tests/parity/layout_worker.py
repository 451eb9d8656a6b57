"""Runs one forward/backward of k2-tiny per layout and writes loss + full-shape grads (and, at
1 rank, TP2+SP and PP2, those of the same conversations unpacked and packed).

Launched by test_layout_parity.py: once as a plain process (the 1-rank reference, which also
writes the initial weights every layout then loads) and under torchrun for the layouts.
Several layouts run in one launch (re-initializing megatron's groups) because each process
start costs seconds of CPU on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import cp_probe
import replay_probe
import rl_probe
import sync_probe
import torch
import torch.distributed as dist
from plan_worker import PLAN_LAYOUTS, run_plan

from k2mcore.config.loader import load_config
from k2mcore.model.build import build_model
from k2mcore.parallel.ddp import Overlap, sync_params, wrap_ddp
from k2mcore.parallel.groups import init_distributed
from k2mcore.parallel.layout import resolve_layout
from k2mcore.parallel.param_counts import stage_parameters
from k2mcore.parallel.reshard import gather_full, scatter_full
from k2mcore.training.step import forward_backward

LAYOUTS: dict[str, dict] = {
    "1rank": {},
    "tp2-sp": {"parallel.tp": 2, "parallel.sp": True},
    "pp2": {"parallel.pp": 2},
    "pp2-vpp2": {"parallel.pp": 2, "parallel.vpp": 2},
    "pp2-uneven": {"parallel.pp": 2, "parallel.first_stage_layers": 1,
                   "parallel.last_stage_layers": 3},
    "ep2": {"parallel.ep": 2},
    "dp2": {},
    "tp2-ep2": {"parallel.tp": 2, "parallel.sp": True, "parallel.ep": 2, "parallel.etp": 1},
    "tp2-pp2-ep2": {"parallel.tp": 2, "parallel.pp": 2, "parallel.ep": 2, "parallel.sp": True},
    "dp4": {},
    "ep2-dp4": {"parallel.ep": 2},  # on 4 ranks: dense DP4, expert DP2
    "pp2-vpp2-dp2": {"parallel.pp": 2, "parallel.vpp": 2},  # on 4 ranks
    # context parallelism: blockwise attention from the gathered latent, with key blocks that
    # do (8) and do not (5, 12) divide the sequence's 32 tokens, and with K2's selective and
    # full recompute
    "cp2": {"parallel.cp": 2, "model.attention_block_size": 5},
    "cp2-ep2": {"parallel.cp": 2, "parallel.ep": 2, "model.attention_block_size": 8,
                "train.recompute": "selective"},
    "cp4": {"parallel.cp": 4, "model.attention_block_size": 5},
    "cp2-tp2-sp": {"parallel.cp": 2, "parallel.tp": 2, "parallel.sp": True,
                   "model.attention_block_size": 12},
    "cp2-pp2-vpp2": {"parallel.cp": 2, "parallel.pp": 2, "parallel.vpp": 2,
                     "model.attention_block_size": 8},
    "cp2-dp2": {"parallel.cp": 2, "model.attention_block_size": 5,  # on 4 ranks
                "train.recompute": "full"},
    "tp2-cp2-ep2": {"parallel.tp": 2, "parallel.sp": True, "parallel.cp": 2, "parallel.ep": 2,
                    "model.attention_block_size": 5},  # on 8 ranks: DP2
}
TWO_RANK = ["tp2-sp", "pp2", "pp2-vpp2", "pp2-uneven", "ep2", "dp2", "tp2-ep2", "cp2", "cp2-ep2"]
EIGHT_RANK = ["tp2-pp2-ep2", "tp2-cp2-ep2"]
FOUR_RANK = ["dp4", "cp4", "cp2-tp2-sp", "cp2-pp2-vpp2", "cp2-dp2"]
ALL = ["1rank", *TWO_RANK, *EIGHT_RANK, *FOUR_RANK]
CP_LAYOUTS = [n for n in ALL if LAYOUTS[n].get("parallel.cp", 1) > 1]
# context-parallel layouts checked on the loss and gradients only (the suite's time budget);
# MuonClip's parity at CP runs at CP2 and CP2 x EP2
GRADS_ONLY = ("cp4", "cp2-tp2-sp", "cp2-pp2-vpp2", "cp2-dp2", "tp2-cp2-ep2")
MUONCLIP = [n for n in ALL if n not in GRADS_ONLY]
# layouts without TP whose collective bytes per training step are counted, MuonClip and AdamW;
# BYTES_ONLY run nothing else (in the 4-rank launch)
BYTES_ONLY = ["ep2-dp4"]
BYTE_LAYOUTS = ("ep2", "dp4", *BYTES_ONLY)
# layouts whose overlapped step is recorded event by event (record_overlap); OVERLAP_ONLY run
# nothing else (in the 4-rank launch)
OVERLAP_ONLY = ["pp2-vpp2-dp2"]
OVERLAP_LAYOUTS = ("dp2", *OVERLAP_ONLY)
EXTRA_FOUR_RANK = BYTES_ONLY + OVERLAP_ONLY
GLOBAL_BATCH, SEQ, SEED = 4, 32, 1234
# every run overlaps data-parallel communication with compute (the trainer's default on GPUs),
# with buckets small enough that the first stage's first chunk has several (megatron's layout for
# AdamW, the owner-aligned one for MuonClip)
BUCKET = 20_000
OVERLAP = Overlap(grad_reduce=True, param_gather=True, bucket_size=BUCKET)
GRAD_OVERLAP = Overlap(grad_reduce=True, bucket_size=BUCKET)  # no distributed optimizer
# the byte counts: overlapped, one bucket per buffer for both optimizers (so their buffers are
# padded alike and their bytes compare exactly)
BYTES_OVERLAP = Overlap(grad_reduce=True, param_gather=True)
# MuonClip phase: steps on fresh batches, with a QK-Clip threshold the toy's logits exceed
MUON_STEPS, MUON_TAU = 5, 0.05
# QK-Clip phase (TP layouts): lr 0, so the clip is the only change to the weights; a threshold
# inside the initial logits' range (about 0.08 to 0.13), so some heads clip and some do not
CLIP_TAU = 0.11
CLIP_LAYOUTS = ("1rank", "tp2-sp", "tp2-ep2", "tp2-pp2-ep2", "cp2", "cp2-ep2")
# the toy is balanced without Newton-Schulz offloads; this layout's MuonClip run forces some
# (both ways, dense SwiGLU halves and expert matrices) so the offload exchange is proved exact
FORCED_OFFLOAD_LAYOUT = "ep2"


def layout_overrides(name: str) -> list[str]:
    """LAYOUTS[name] as config overrides (string fields verbatim, the rest as JSON)."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in LAYOUTS[name].items()]


def force_offloads(param_layout) -> None:
    """Every rank of the stage sends the next rank its first up-half of a fused fc1 and its
    first expert matrix block (the planner's order: deterministic on every rank)."""
    import dataclasses

    from k2mcore.optim.muonclip.ns_offload import _jobs

    stage = param_layout.stage
    ranks = sorted(stage.loads)
    moves = []
    for r, jobs in _jobs(stage).items():
        helper = ranks[(ranks.index(r) + 1) % len(ranks)]
        picks = [next((j for j in jobs if j.half == 1 and not j.expert), None),
                 next((j for j in jobs if j.expert), None)]
        moves += [dataclasses.replace(j, helper=helper) for j in picks if j is not None]
    moves.sort(key=lambda m: (m.holder, m.chunk, m.expert, m.name, m.half))
    param_layout.stage = dataclasses.replace(stage, offloads=moves)


def micro_batches(vocab: int, groups, seed: int = SEED) -> list[dict]:
    """This data-parallel rank's share of a fixed global batch, one sequence per micro-batch."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g)
    dp, rank = groups.layout.dp, groups.dp_rank
    per_rank = GLOBAL_BATCH // dp
    mine = data[rank * per_rank : (rank + 1) * per_rank]
    return [
        {"tokens": s[None, :-1], "labels": s[None, 1:], "loss_mask": torch.ones(1, SEQ)}
        for s in mine
    ]


# SFT-style loss masks: one "assistant span" per sequence, of very different lengths, so a
# mean of per-micro-batch (or per-rank) means would differ from the per-token mean
SFT_SPANS = ((2, 5), (0, 29), (11, 19), (30, 32))


def sft_micro_batches(vocab: int, groups, mbs: int = 1) -> list[dict]:
    """micro_batches' global batch with SFT_SPANS as loss masks, `mbs` sequences per
    micro-batch (this DP rank's share)."""
    seqs = micro_batches(vocab, groups)
    per_rank = GLOBAL_BATCH // groups.layout.dp
    for i, s in enumerate(seqs):
        a, b = SFT_SPANS[groups.dp_rank * per_rank + i]
        s["loss_mask"] = torch.zeros(1, SEQ)
        s["loss_mask"][0, a:b] = 1.0
    return [{k: torch.cat([s[k] for s in seqs[j:j + mbs]]) for k in seqs[0]}
            for j in range(0, len(seqs), mbs)]


def _sft(model, groups, vocab: int, mbs: int = 1) -> tuple[float, dict]:
    loss = forward_backward(model, groups, sft_micro_batches(vocab, groups, mbs),
                            seq_length=SEQ, micro_batch_size=mbs)
    return loss, gather_full(model, swap=lambda p: p.main_grad)


# Packed pass: conversations of these lengths (token/label pairs) with one loss span each,
# unpacked (one per row of SEQ, padded) and packed into four rows of SEQ (the first full, the
# others ending in a padding segment), at 1 and 2 rows per micro-batch
PACK_LENGTHS = (11, 16, 5, 20, 9, 3, 27, 14, 6, 8)
PACK_ROWS = ((0, 1, 2), (3, 4), (5, 6), (7, 8, 9))
# with context parallelism every conversation is padded to a multiple of 2·cp (4 at CP2: 132
# positions), so they pack into five rows, and one padding-only row makes mbs 2 possible
CP_PACK_ROWS = ((6,), (3, 4), (1, 7), (0, 2, 8), (5, 9), ())
PACKED_LAYOUTS = ("1rank", "tp2-sp", "pp2", "cp2", "cp2-ep2", "cp2-tp2-sp")


def _conversations(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(SEED + 1)
    convs = []
    for i, n in enumerate(PACK_LENGTHS):
        ids = torch.randint(1, vocab, (n + 1,), generator=g)
        mask = torch.zeros(n)
        a = int(torch.randint(0, n, (1,), generator=g))
        mask[a:a + 1 + int(torch.randint(0, n - a, (1,), generator=g))] = 1.0
        convs.append({"tokens": ids[:-1], "labels": ids[1:], "loss_mask": mask,
                      "position_ids": torch.arange(n)})
    return convs


def _padding(n: int, start: int = 0) -> dict:
    return {"tokens": torch.zeros(n, dtype=torch.int64), "labels": torch.zeros(n, dtype=torch.int64),
            "loss_mask": torch.zeros(n), "position_ids": torch.arange(start, start + n)}


def _row(parts: list[dict], pad_to: int = 1) -> dict:
    """Conversations end to end in one row of SEQ, the rest a padding segment (pad id 0,
    positions from 0 again, no loss). `pad_to`: each conversation first padded to a multiple
    of it, its positions going on (as the packed chat dataset lays it out for CP)."""
    padded = []
    for p in parts:
        n = p["tokens"].numel()
        extra = -n % pad_to
        padded.append({k: torch.cat([p[k], _padding(extra, n)[k]]) for k in p} if extra else p)
    pad = SEQ - sum(p["tokens"].numel() for p in padded)
    tail = [_padding(pad)] if pad else []
    return {k: torch.cat([p[k] for p in padded + tail])[None] for k in _padding(0)}


def packed_micro_batches(vocab: int, groups, *, packed: bool, mbs: int = 1) -> list[dict]:
    """The same conversations one per row or packed (PACK_ROWS); this DP rank's micro-batches
    of `mbs` rows."""
    convs = _conversations(vocab)
    cp = groups.layout.cp
    if packed and cp > 1:
        rows = [_row([convs[i] for i in r], 2 * cp) for r in CP_PACK_ROWS]
    elif packed:
        rows = [_row([convs[i] for i in r]) for r in PACK_ROWS]
    else:
        rows = [_row([c]) for c in convs]
    micro = [{k: torch.cat([r[k] for r in rows[j:j + mbs]]) for k in rows[0]}
             for j in range(0, len(rows), mbs)]
    return micro[groups.dp_rank::groups.layout.dp]


def _packed_pass(model, groups, vocab: int) -> dict:
    """{"unpacked" | "packed" | "packed-mbs2": (loss, full grads)} on the same conversations,
    each from the initial routing (run() turns the router-bias update off: it counts the
    padding, which packing changes)."""
    out = {}
    for tag, packed, mbs in (("unpacked", False, 1), ("packed", True, 1),
                             ("packed-mbs2", True, 2)):
        loss = forward_backward(model, groups, packed_micro_batches(vocab, groups, packed=packed,
                                                                    mbs=mbs),
                                seq_length=SEQ, micro_batch_size=mbs, packed=packed)
        out[tag] = (loss, gather_full(model, swap=lambda p: p.main_grad))
    return out


def run(name: str, out: str, init_path: str, write_init: bool) -> None:
    overrides = layout_overrides(name)
    # no router-bias update (it runs in finalize_model_grads): the passes below then all see
    # the initial routing (run_muonclip's steps check the update itself)
    cfg = load_config("k2-tiny", overrides + [f"train.seq_length={SEQ}", "train.dtype=fp32",
                                              "model.moe_router_bias_update_rate=0.0"])
    layout = resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    groups = init_distributed(layout, seed=SEED)
    model = wrap_ddp(build_model(cfg, groups), groups, distributed_optimizer=False,
                     overlap=GRAD_OVERLAP)
    # parameters this rank holds, against the analytic count `k2m-train --check` prints
    held = sum(p.numel() for chunk in model for p in chunk.module.parameters())
    counts: list = [None] * dist.get_world_size()
    dist.all_gather_object(counts, (groups.pp_rank, held))
    expected = stage_parameters(cfg, layout)
    fresh = gather_full(model)  # as built: train.init=layout_invariant
    if write_init and dist.get_rank() == 0:
        torch.save(fresh, init_path)
    scatter_full(model, torch.load(init_path, weights_only=True))
    loss = forward_backward(
        model, groups, micro_batches(cfg.model.vocab_size, groups), seq_length=SEQ,
        micro_batch_size=1)
    grads = gather_full(model, swap=lambda p: p.main_grad)
    sft = {1: _sft(model, groups, cfg.model.vocab_size)}
    if name == "1rank":  # the same global batch in 1 and 2 micro-batches (4 above)
        sft.update({mbs: _sft(model, groups, cfg.model.vocab_size, mbs) for mbs in (2, 4)})
    packing = _packed_pass(model, groups, cfg.model.vocab_size) if name in PACKED_LAYOUTS else None
    if dist.get_rank() == 0:
        torch.save(
            {"loss": loss, "grads": grads, "param_counts": counts, "expected_counts": expected,
             "fresh_weights": fresh, "sft": sft, "packing": packing},
            os.path.join(out, f"{name}.pt"),
        )


def run_muonclip(name: str, out: str, init_path: str, *, lr: float, steps: int, tau: float,
                 tag: str) -> None:
    """`steps` MuonClip steps from the shared initial weights; saves losses, attention reports,
    the full weights after every step and each rank's Newton-Schulz FLOPs."""
    from k2mcore.optim.build import build_optimizer
    from k2mcore.optim.chain import inner_optimizers
    from k2mcore.parallel.ddp import ddp_param_layout
    from k2mcore.training.metrics import attention_report

    overrides = layout_overrides(name)
    cfg = load_config("k2-tiny", overrides + [
        f"train.seq_length={SEQ}", "train.dtype=fp32", "optimizer.name=muonclip",
        f"optimizer.lr={lr}", "optimizer.min_lr=0", "optimizer.warmup_iters=0",
        "optimizer.decay_style=constant", f"qk_clip.threshold={tau}",
        f"train.ddp_bucket_size={BUCKET}", "train.overlap_grad_reduce=true",
        "train.overlap_param_gather=true",
        # the clip phase re-measures logits on the same batch: keep routing fixed
        f"model.moe_router_bias_update_rate={1e-3 if lr else 0.0}"])
    groups = init_distributed(resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1"))), seed=SEED)
    chunks = build_model(cfg, groups)
    param_layout = ddp_param_layout(cfg, chunks, groups)
    if name == FORCED_OFFLOAD_LAYOUT:
        force_offloads(param_layout)
    model = wrap_ddp(chunks, groups, distributed_optimizer=True,
                     param_layout=param_layout, overlap=Overlap.from_config(cfg))
    scatter_full(model, torch.load(init_path, weights_only=True))
    optimizer, _ = build_optimizer(cfg, model, groups, param_layout=param_layout)
    inner = inner_optimizers(optimizer)
    flops = sum(o.ns_flops_here for o in inner)
    offloaded = sum(len(jobs) for o in inner if o.offload is not None for jobs in o.offload.send)
    silent = all(o.plan.silent for o in inner)
    rows, weights = [], [gather_full(model)]
    for step in range(steps):
        optimizer.zero_grad()
        loss = forward_backward(model, groups, micro_batches(cfg.model.vocab_size, groups, SEED + step),
                                seq_length=SEQ, micro_batch_size=1)
        ok, _, _ = optimizer.step()
        rows.append({"loss": loss, "ok": ok, **attention_report(cfg, optimizer, model, groups, stepped=ok)})
        sync_params(model)  # the gathers overlap_param_gather leaves to the next forward
        weights.append(gather_full(model))
    # one more forward on the last batch: the logits the clipped weights give
    forward_backward(model, groups, micro_batches(cfg.model.vocab_size, groups, SEED + steps - 1), seq_length=SEQ,
                     micro_batch_size=1, forward_only=True)
    heads = _per_head_logits(model)
    all_flops: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_flops, flops)
    all_silent: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_silent, silent)
    all_offloaded: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_offloaded, offloaded)
    # (pipeline rank, buckets of each DDP buffer of the first chunk) per rank
    buckets: list = [None] * dist.get_world_size()
    dist.all_gather_object(buckets, (groups.pp_rank, [
        len(b.buckets) for b in model[0].buffers + model[0].expert_parallel_buffers]))
    if dist.get_rank() == 0:
        torch.save({"rows": rows, "weights": weights, "ns_flops": all_flops, "heads_after": heads,
                    "exchange_free": all(all_silent), "offloaded": all_offloaded,
                    "buckets": buckets},
                   os.path.join(out, f"{name}.{tag}.pt"))


def count_step_bytes(name: str, out: str, init_path: str) -> None:
    """Bytes every rank hands to torch.distributed collectives over one whole training step
    (zero_grad, forward/backward with the gradient reduce-scatter and, overlapped, the previous
    step's parameter all-gather, the optimizer step, the attention report), after a first
    uncounted step, MuonClip against AdamW on the same model."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from harness.comm_bytes import count_collective_bytes, step_part, total_over_ranks
    from k2mcore.optim.build import build_optimizer
    from k2mcore.parallel.ddp import ddp_param_layout
    from k2mcore.training.metrics import attention_report

    result = {}
    for optimizer_name in ("muonclip", "adamw"):
        overrides = layout_overrides(name)
        cfg = load_config("k2-tiny", overrides + [
            f"train.seq_length={SEQ}", "train.dtype=fp32", f"optimizer.name={optimizer_name}",
            "model.measure_max_attn_logit=true"])
        groups = init_distributed(resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1"))),
                                  seed=SEED)
        chunks = build_model(cfg, groups)
        param_layout = ddp_param_layout(cfg, chunks, groups)
        model = wrap_ddp(chunks, groups, distributed_optimizer=True,
                         param_layout=param_layout, overlap=BYTES_OVERLAP)
        scatter_full(model, torch.load(init_path, weights_only=True))
        optimizer, _ = build_optimizer(cfg, model, groups, param_layout=param_layout)
        for step in range(2):
            batches = micro_batches(cfg.model.vocab_size, groups, SEED + step)
            dist.barrier()
            log: list = []
            with count_collective_bytes(by_kind=True, log=log) as counts:
                optimizer.zero_grad()
                forward_backward(model, groups, batches, seq_length=SEQ, micro_batch_size=1)
                optimizer.step()
                attention_report(cfg, optimizer, model, groups, stepped=True)
        mine = sum(counts.values())
        # ZeRO-1's minimum from the buffer sizes: each buffer's fp32 gradients reduce-scattered
        # whole, its fp32 parameters all-gathered once (this rank hands over its 1/d share)
        buffers = [b for c in model for b in c.buffers + c.expert_parallel_buffers
                   if b.data_parallel_world_size > 1]
        zero1 = {"reduce_scatter_tensor": sum(4 * b.grad_data.numel() for b in buffers),
                 "all_gather_into_tensor": sum(4 * b.param_data.numel() / b.data_parallel_world_size
                                               for b in buffers)}
        # the DDP buffers' collectives (data parallelism's reduce-scatters and all-gathers), as
        # handed over and in bus bytes
        ops = {"reduce_scatter_tensor": "grad-RS", "all_gather_into_tensor": "param-AG"}
        ddp = {op: sum(e[2] for e in log if step_part(*e[:2]) == part) for op, part in ops.items()}
        ddp_bus = {op: sum(e[5] for e in log if step_part(*e[:2]) == part)
                   for op, part in ops.items()}
        by_op: Counter = Counter()
        for e in log:
            by_op[e[1]] += e[2]
        per_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, (mine, dict(by_op), zero1, ddp, ddp_bus,
                                          sum(e[5] for e in log)))
        result[optimizer_name] = {"total": total_over_ranks(counts),
                                  "per_rank": [r[:2] for r in per_rank],
                                  "zero1": [r[2] for r in per_rank],
                                  "ddp": [r[3] for r in per_rank],
                                  "ddp_bus": [r[4] for r in per_rank],
                                  "bus_total": sum(r[5] for r in per_rank)}
    if dist.get_rank() == 0:
        torch.save(result, os.path.join(out, f"{name}.bytes.pt"))


def record_overlap(name: str, out: str, init_path: str) -> None:
    """Two AdamW steps (distributed optimizer, overlap on, BUCKET-sized buckets), the order of
    events on this rank: each parameter's gradient accumulation ("grad", chunk, bucket), each
    bucket's reduce-scatter ("rs", chunk, bucket), each parameter all-gather ("ag", chunk,
    bucket, issued in a forward pre-hook?), the end of the backward ("finalize") and the
    optimizer step ("step"). megatron's hook on a gradient accumulator runs before the one
    added here, so a bucket's reduce-scatter is logged before its last "grad"."""
    import inspect

    from megatron.core.distributed import param_and_grad_buffer as pgb

    from k2mcore.optim.build import build_optimizer

    cfg = load_config("k2-tiny", layout_overrides(name) + [
        f"train.seq_length={SEQ}", "train.dtype=fp32", "optimizer.name=adamw"])
    groups = init_distributed(resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1"))),
                              seed=SEED)
    model = wrap_ddp(build_model(cfg, groups), groups, distributed_optimizer=True,
                     overlap=OVERLAP)
    scatter_full(model, torch.load(init_path, weights_only=True))
    optimizer, _ = build_optimizer(cfg, model, groups)
    events: list = []
    where = {}  # data_ptr of a bucket's grad_data / param_data -> (chunk, bucket)
    for c, chunk in enumerate(model):
        for buf in chunk.buffers + chunk.expert_parallel_buffers:
            for b, bucket in enumerate(buf.buckets):
                where[bucket.grad_data.data_ptr()] = where[bucket.param_data.data_ptr()] = (c, b)
                for p in bucket.params:
                    acc = p.expand_as(p).grad_fn.next_functions[0][0]
                    acc.register_hook(lambda *_, c=c, b=b: events.append(("grad", c, b)))

    def in_pre_hook() -> bool:
        return any(f.function == "hook" and f.filename.endswith("distributed_data_parallel.py")
                   for f in inspect.stack(0))

    rs, ag = pgb.dist_reduce_scatter_func, pgb.dist_all_gather_func

    def reduce_scatter(output, input, *a, **kw):
        events.append(("rs", *where[input.data_ptr()]))
        return rs(output, input, *a, **kw)

    def all_gather(output, input, *a, **kw):
        events.append(("ag", *where[output.data_ptr()], in_pre_hook()))
        return ag(output, input, *a, **kw)

    config = model[0].config
    fin = config.finalize_model_grads_func

    def finalize(*a, **kw):
        events.append(("finalize",))
        return fin(*a, **kw)

    pgb.dist_reduce_scatter_func, pgb.dist_all_gather_func = reduce_scatter, all_gather
    config.finalize_model_grads_func = finalize
    try:
        for step in range(2):
            events.append(("begin", step))
            optimizer.zero_grad()
            forward_backward(model, groups, micro_batches(cfg.model.vocab_size, groups,
                                                          SEED + step),
                             seq_length=SEQ, micro_batch_size=1)
            optimizer.step()
            events.append(("step",))
    finally:
        pgb.dist_reduce_scatter_func, pgb.dist_all_gather_func = rs, ag
        config.finalize_model_grads_func = fin
    buckets = {(c, b) for c, b in set(where.values())}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, {"events": events, "buckets": sorted(buckets),
                                   "pp_rank": groups.pp_rank,
                                   "micro_batches": GLOBAL_BATCH // groups.layout.dp})
    if dist.get_rank() == 0:
        torch.save(every, os.path.join(out, f"{name}.overlap.pt"))


def _per_head_logits(model) -> dict:
    """{layer number: max logit per head, all heads}; resets the probes (collective)."""
    from megatron.core import parallel_state as ps

    from k2mcore.optim.muonclip.qk_clip import mla_attentions

    local = {}
    for a in mla_attentions([c.module for c in model]):
        probe = a.core_attention.current_max_attn_logits
        a.core_attention.current_max_attn_logits = None
        dist.all_reduce(probe, op=dist.ReduceOp.MAX,
                        group=ps.get_data_parallel_group(with_context_parallel=True))
        parts = [torch.zeros_like(probe) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, probe, group=ps.get_tensor_model_parallel_group())
        local[a.layer_number] = torch.cat(parts)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {k: v for d in gathered for k, v in d.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--write-init", action="store_true")
    args = ap.parse_args()
    init_path = os.path.join(args.out, "init.pt")
    for name in args.layouts.split(","):
        if name in BYTES_ONLY:
            count_step_bytes(name, args.out, init_path)
        if name in OVERLAP_ONLY:
            record_overlap(name, args.out, init_path)
        if name in EXTRA_FOUR_RANK:
            continue
        run(name, args.out, init_path, args.write_init)
        if name in cp_probe.RUNS:
            cp_probe.measure(name, args.out)
        if name in rl_probe.RUNS:
            rl_probe.measure(name, args.out, init_path, SEQ)
        if name in replay_probe.RUNS:
            replay_probe.measure(name, args.out, init_path, SEQ)
        if name in sync_probe.RUNS:
            sync_probe.measure(name, args.out, init_path, SEQ)
        if name in GRADS_ONLY:
            continue
        run_muonclip(name, args.out, init_path, lr=3e-3, steps=MUON_STEPS, tau=MUON_TAU,
                     tag="muonclip")
        if name in CLIP_LAYOUTS:
            run_muonclip(name, args.out, init_path, lr=0.0, steps=1, tau=CLIP_TAU, tag="clip")
        if name in BYTE_LAYOUTS:
            count_step_bytes(name, args.out, init_path)
        if name in OVERLAP_LAYOUTS:
            record_overlap(name, args.out, init_path)
        if name in PLAN_LAYOUTS:
            run_plan(name, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
