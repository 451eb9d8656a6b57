"""Bytes per training step by kind, against ZeRO-1's minimum, for ZeRO-1 AdamW and MuonClip.

    python benchmarks/bench_dp_bytes.py [--layouts dp4 ep2 tp2-pp2-ep2-dp2]

Per layout (the widened k2-tiny of bench_muonclip.py, 8 x 64 tokens per step, fp32, gloo ranks)
and optimizer, one whole training step after a warm-up step (zero_grad, forward/backward with the
gradient reduce-scatter, optimizer step with the parameter all-gather, the attention report),
counted at the torch.distributed API (tests/harness/comm_bytes.py) and summed over ranks, in two
conventions (docs/testing.md, 'Counting bytes'): bytes handed over, and NCCL-tests' bus bytes.
Kinds:
  grad-RS    the DDP buffers' gradient reduce-scatter
  param-AG   the DDP buffers' parameter all-gather
  muon-x     MuonClip's Newton-Schulz exchange (all_to_alls; none without TP)
  ep-a2a     the MoE dispatcher's all-to-alls
  rest       everything else: TP's and PP's traffic, the small all-reduces (grad norm, router
             bias counts, loss totals, QK-Clip's max logits), the tokens-per-expert gather
ZeRO-1's minimum comes from the built buffers' sizes: every buffer's fp32 gradients
reduce-scattered once and its fp32 parameters all-gathered once over its data-parallel group.
Targets (issue 30): param-AG bus = grad-RS bus within 1% for both optimizers at every layout;
MuonClip's total <= 1.02x AdamW's at every layout without TP.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]

from bench_muonclip import GLOBAL_BATCH, SEQ, WIDE, _batches  # noqa: E402
from harness.comm_bytes import STEP_PARTS as KINDS  # noqa: E402
from harness.comm_bytes import step_part  # noqa: E402

LAYOUTS = {
    4: {"dp4": {}, "ep2": {"parallel.ep": 2}},
    8: {"tp2-pp2-ep2-dp2": {"parallel.tp": 2, "parallel.sp": True, "parallel.pp": 2,
                            "parallel.ep": 2, "parallel.etp": 1}},
}
OPTIMIZERS = ("adamw", "muonclip")


def _build(overrides: dict, optimizer: str):
    from k2mcore.config.loader import load_config
    from k2mcore.model.build import build_model
    from k2mcore.optim.build import build_optimizer
    from k2mcore.parallel.ddp import ddp_param_layout, wrap_ddp
    from k2mcore.parallel.groups import init_distributed
    from k2mcore.parallel.layout import resolve_layout

    cfg = load_config("k2-tiny", [f"{k}={json.dumps(v)}" for k, v in overrides.items()] + WIDE + [
        f"train.seq_length={SEQ}", "train.dtype=fp32", f"optimizer.name={optimizer}",
        "model.measure_max_attn_logit=true"])
    groups = init_distributed(resolve_layout(cfg, int(os.environ["WORLD_SIZE"])), seed=1)
    chunks = build_model(cfg, groups)
    param_layout = ddp_param_layout(cfg, chunks, groups)
    model = wrap_ddp(chunks, groups, distributed_optimizer=True, param_layout=param_layout)
    opt, _ = build_optimizer(cfg, model, groups, param_layout=param_layout)
    return cfg, groups, model, opt


def _zero1(model) -> dict:
    """This rank's share of ZeRO-1's minimum: {convention: {kind: bytes}} from the buffers."""
    handed, bus = Counter(), Counter()
    for chunk in model:
        for buf in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
            d = buf.data_parallel_world_size
            if d == 1:
                continue
            n = 4 * buf.grad_data.numel()  # fp32 gradients and fp32 parameters
            handed["grad-RS"] += n
            handed["param-AG"] += n / d
            bus["grad-RS"] += n * (d - 1) / d
            bus["param-AG"] += n * (d - 1) / d
    return {"handed": dict(handed), "bus": dict(bus)}


def _count(overrides: dict, optimizer: str) -> dict:
    import torch.distributed as dist

    from harness.comm_bytes import count_collective_bytes
    from k2mcore.training.metrics import attention_report
    from k2mcore.training.step import forward_backward

    cfg, groups, model, opt = _build(overrides, optimizer)
    for step in range(2):  # the first step exchanges flags megatron caches: count the second
        log: list = []
        dist.barrier()
        with count_collective_bytes(by_kind=True, log=log):
            opt.zero_grad()
            forward_backward(model, groups, _batches(cfg.model.vocab_size, step, groups,
                                                     GLOBAL_BATCH),
                             seq_length=SEQ, micro_batch_size=1)
            opt.step()
            attention_report(cfg, opt, model, groups, stepped=True)
    handed, bus = Counter(), Counter()
    for label, op, nbytes, _shape, _site, bus_bytes in log:
        handed[step_part(label, op)] += nbytes
        bus[step_part(label, op)] += bus_bytes
    return {"handed": dict(handed), "bus": dict(bus), "zero1": _zero1(model)}


def worker(world: int, names: list, out: str) -> None:
    import torch.distributed as dist

    rows = {}
    for name, overrides in LAYOUTS[world].items():
        if names and name not in names:
            continue
        for optimizer in OPTIMIZERS:
            mine = _count(overrides, optimizer)
            every: list = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)

            def total(*path):
                return {k: sum(_get(r, *path).get(k, 0) for r in every) for k in KINDS}

            rows[(name, optimizer)] = {
                "handed": total("handed"), "bus": total("bus"),
                "zero1_handed": total("zero1", "handed"), "zero1_bus": total("zero1", "bus")}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump([[list(k), v] for k, v in rows.items()], f)
    dist.barrier()
    dist.destroy_process_group()


def _get(d: dict, *path: str) -> dict:
    for p in path:
        d = d[p]
    return d


def _collect(names: list) -> dict:
    from harness.launching import local_command, local_env

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world, layouts in LAYOUTS.items():
            if names and not set(names) & set(layouts):
                continue
            out = os.path.join(tmp, f"{world}.json")
            cmd = local_command(world, __file__, ["--worker", str(world), "--out", out,
                                                  *(["--layouts", *names] if names else [])])
            subprocess.run(cmd, env=local_env(), check=True, capture_output=True)
            with open(out) as f:
                rows.update({tuple(k): v for k, v in json.load(f)})
    return rows


def report(rows: dict) -> bool:
    mb = 1e6
    print(f"Bytes per training step summed over ranks, widened k2-tiny ({GLOBAL_BATCH} x {SEQ} "
          f"tokens, fp32, gloo), MB handed over / MB bus; 'min' = ZeRO-1's minimum from the "
          f"buffer sizes")
    print(f"{'layout':16s} {'optimizer':9s} " + " ".join(f"{k:>15s}" for k in KINDS)
          + f" {'total':>15s} {'AG/RS bus':>9s} {'RS/min':>7s} {'AG/min':>7s} {'x AdamW':>8s}")
    ok = True
    for (name, optimizer), r in rows.items():
        h, b = r["handed"], r["bus"]
        cells = " ".join(f"{h[k] / mb:7.3f}/{b[k] / mb:<7.3f}" for k in KINDS)
        tot_h, tot_b = sum(h.values()), sum(b.values())
        ag_rs = b["param-AG"] / b["grad-RS"]
        rs_min = b["grad-RS"] / r["zero1_bus"]["grad-RS"]
        ag_min = b["param-AG"] / r["zero1_bus"]["param-AG"]
        adam = rows[(name, "adamw")]
        vs = sum(h.values()) / sum(adam["handed"].values())
        print(f"{name:16s} {optimizer:9s} {cells} {tot_h / mb:7.3f}/{tot_b / mb:<7.3f} "
              f"{ag_rs:9.4f} {rs_min:7.4f} {ag_min:7.4f} {vs:8.4f}")
        ok &= abs(ag_rs - 1) <= 0.01
        if "tp" not in name:
            ok &= vs <= 1.02
    print(f"targets (AG bus = RS bus within 1%; MuonClip <= 1.02x AdamW without TP): "
          f"{'met' if ok else 'MISSED'}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", nargs="+", default=[], help="only these (default: all)")
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.layouts, args.out)
        return
    report(_collect(args.layouts))


if __name__ == "__main__":
    main()
