"""Bytes one whole training step hands to torch.distributed, by kind (tp/ep/pp/dp/optimizer),
against the planner's prediction (k2mcore.plan.comm).

`measure(cfg, groups, model, optimizer, batches)` counts one step on this rank (zero_grad,
forward_backward with the gradient reduce-scatter, optimizer.step with the parameter all-gather,
the attention report); `dp_buffers(model, groups)` reads the built DDP buffers as the planner's
DP term takes them. Standalone driver (several layouts share one launch, re-initializing
megatron's groups):

    torchrun --standalone --nproc-per-node=2 tests/parity/comm_probe.py --layouts tp2-sp,ep2
    python tests/parity/comm_probe.py --layouts 1rank          # one process

prints one row per (layout, optimizer, rank, kind): predicted, counted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from harness.comm_bytes import count_collective_bytes, scope  # noqa: E402

KINDS = ("tp", "ep", "pp", "dp", "optimizer")


def measure(cfg, groups, model, optimizer, batches, *, seq_length=None, log=None,
            bus=None) -> dict:
    """{kind: bytes} this rank hands to collectives and p2p sends over one training step;
    `bus`, a Counter, gets {kind: bus bytes} of the same step."""
    from k2mcore.training.metrics import attention_report
    from k2mcore.training.step import forward_backward

    seq = seq_length or cfg.train.seq_length
    mbs = batches[0]["tokens"].shape[0]
    dist.barrier()
    with count_collective_bytes(by_kind=True, log=log, bus=bus) as counts:
        optimizer.zero_grad()
        forward_backward(model, groups, batches, seq_length=seq, micro_batch_size=mbs)
        optimizer.step()
        with scope("optimizer"):  # the max-logit report: QK-Clip's measurement
            attention_report(cfg, optimizer, model, groups, stepped=True)
    return dict(counts)


def dp_buffers(model, groups) -> list[tuple[int, int, int]]:
    """(bucket numel, this rank's shard numel, data-parallel group size) of every DDP bucket."""
    from k2mcore.compat.uneven_shards import bounds_of

    out = []
    for chunk in model:
        for buf in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
            size = buf.data_parallel_group.size()
            rank = buf.data_parallel_group.rank()
            for bucket in buf.buckets:
                numel = bucket.grad_data.numel()
                bounds = bounds_of(bucket.grad_data)
                shard = (bounds[rank][1] - bounds[rank][0]) if bounds else numel // size
                out.append((numel, shard, size))
    return out


def _build(name: str, optimizer_name: str, world: int):
    from layout_worker import SEED, SEQ, layout_overrides

    from k2mcore.config.loader import load_config
    from k2mcore.model.build import build_model
    from k2mcore.optim.build import build_optimizer
    from k2mcore.parallel.ddp import ddp_param_layout, wrap_ddp
    from k2mcore.parallel.groups import init_distributed
    from k2mcore.parallel.layout import resolve_layout

    overrides = layout_overrides(name)
    cfg = load_config("k2-tiny", overrides + [
        f"train.seq_length={SEQ}", "train.dtype=fp32", f"optimizer.name={optimizer_name}",
        "model.measure_max_attn_logit=true", "train.global_batch_size=4",
        "train.micro_batch_size=1"])
    layout = resolve_layout(cfg, world)
    groups = init_distributed(layout, seed=SEED)
    chunks = build_model(cfg, groups)
    param_layout = ddp_param_layout(cfg, chunks, groups)
    model = wrap_ddp(chunks, groups, distributed_optimizer=True, param_layout=param_layout)
    optimizer, _ = build_optimizer(cfg, model, groups, param_layout=param_layout)
    return cfg, layout, groups, model, optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--optimizers", default="adamw,muonclip")
    ap.add_argument("--call-log", dest="log", action="store_true", help="every counted call (rank 0)")
    ap.add_argument("--json", help="write the rows here (rank 0)")
    args = ap.parse_args()
    from layout_worker import micro_batches

    from k2mcore.plan.comm import comm_bytes

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = []
    for name in args.layouts.split(","):
        for opt in args.optimizers.split(","):
            cfg, layout, groups, model, optimizer = _build(name, opt, world)
            log: list = []
            counted = measure(cfg, groups, model, optimizer,
                              micro_batches(cfg.model.vocab_size, groups), log=log)
            coords = {"pp": groups.pp_rank, "tp": groups.tp_rank, "ep": groups.ep_rank,
                      "dp": groups.dp_rank}
            predicted = comm_bytes(cfg, layout, rank=coords, dp_buffers=dp_buffers(model, groups),
                                   dtype_bytes=4)
            mine = {"layout": name, "optimizer": opt, "rank": dist.get_rank(), "coords": coords,
                    "counted": counted, "predicted": predicted, "log": log if args.log else None}
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
            rows += everyone
    if dist.get_rank() == 0:
        print(f"{'layout':12} {'optimizer':9} {'rank':>4} {'kind':9} {'predicted':>10} "
              f"{'counted':>10}  match")
        for r in rows:
            for kind in sorted(set(KINDS) | set(r["counted"]) | set(r["predicted"])):
                p, c = r["predicted"].get(kind, 0), r["counted"].get(kind, 0)
                ok = (abs(p - c) <= 0.1 * max(c, 1)) if kind == "ep" else p == c
                print(f"{r['layout']:12} {r['optimizer']:9} {r['rank']:>4} {kind:9} {p:>10} "
                      f"{c:>10}  {'ok' if ok else 'MISMATCH'}")
            if r["log"]:
                for entry in r["log"]:
                    print("   ", r["layout"], r["optimizer"], r["rank"], *entry)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
