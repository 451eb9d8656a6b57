"""Measured activation memory of one forward/backward: the peak bytes autograd holds for
backward (tests/harness/saved_bytes.py) on this rank, for the planner's check
(k2mcore/plan/activations.py). `measure` is what the parity worker calls per layout;
`python tests/parity/activation_probe.py` (torchrun for several ranks) is the standalone driver
that prints measured against planned for a set of layouts, recompute modes and probe settings.

Run (from tests/parity): `python activation_probe.py` (1 rank), `python -m torch.distributed.run
--standalone --nproc-per-node=2 activation_probe.py` (tp2-sp, pp2-vpp2, ep2, dp2), and with
--nproc-per-node=8 --models tiny (tp2-pp2-ep2). Measured on k2-tiny and WIDE (s=32, fp32,
global batch 4, micro batch 1), planned/measured of the peak over ranks: 1rank, dp2, tp2-sp,
pp2-vpp2 within 0.993..1.007 for every recompute mode and probe setting; ep2 0.958..0.999 and
tp2-pp2-ep2 per rank 0.960..1.022 (non-uniform routing moves the experts' terms).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness.saved_bytes import count_saved_bytes, model_storages, print_sites  # noqa: E402


def measure(cfg, groups, model, batches, *, attribute: bool = False, stats_out=None) -> int:
    """Peak bytes saved for backward on this rank over one forward_backward of `batches`
    (this DP rank's micro-batches) through megatron's schedule; parameters, gradients and DDP
    buffers excluded."""
    from k2mcore.training.step import forward_backward

    exclude = model_storages(model)
    with count_saved_bytes(exclude, attribute=attribute) as stats:
        forward_backward(model, groups, batches, seq_length=cfg.train.seq_length,
                         micro_batch_size=cfg.train.micro_batch_size)
    if stats_out is not None:
        stats_out.append(stats)
    return stats.peak


# the driver's layouts: parity worker names (tests/parity/layout_worker.py LAYOUTS) by world size
DRIVER_LAYOUTS = {1: ["1rank"], 2: ["tp2-sp", "pp2-vpp2", "ep2", "dp2"], 8: ["tp2-pp2-ep2"]}
WIDE = ["model.hidden_size=96", "model.num_attention_heads=6", "model.num_experts=8",
        "model.moe_ffn_hidden_size=48", "model.ffn_hidden_size=160", "model.q_lora_rank=null"]
MODELS = {"tiny": [], "wide": WIDE}


def _run_one(layout_name: str, model_name: str, recompute: str, probe: bool,
             attribute: bool = False) -> dict:
    from layout_worker import SEED, SEQ, layout_overrides, micro_batches

    from k2mcore.config.loader import load_config
    from k2mcore.model.build import build_model
    from k2mcore.parallel.ddp import wrap_ddp
    from k2mcore.parallel.groups import init_distributed
    from k2mcore.parallel.layout import resolve_layout
    from k2mcore.plan.activations import activation_bytes

    overrides = layout_overrides(layout_name)
    cfg = load_config("k2-tiny", overrides + MODELS[model_name] + [
        f"train.seq_length={SEQ}", "train.dtype=fp32", "train.global_batch_size=4",
        f"train.recompute={recompute}", f"model.measure_max_attn_logit={str(probe).lower()}"])
    layout = resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    groups = init_distributed(layout, seed=SEED)
    model = wrap_ddp(build_model(cfg, groups), groups, distributed_optimizer=True)
    batches = micro_batches(cfg.model.vocab_size, groups)
    stats: list = []
    measured = measure(cfg, groups, model, batches, attribute=attribute, stats_out=stats)
    plan = activation_bytes(cfg, layout, attention="local", dtype_bytes=4)
    planned = plan[groups.pp_rank].total
    if attribute and dist.get_rank() == 0:
        print_sites(stats[0])
        print("forward states at backward starts:", stats[0].per_micro_batch, "peak", measured)
    rows: list = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (dist.get_rank(), groups.pp_rank, measured, planned))
    return {"layout": layout_name, "model": model_name, "recompute": recompute, "probe": probe,
            "ranks": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default=None, help="comma list (default: by world size)")
    ap.add_argument("--models", default="tiny,wide")
    ap.add_argument("--recompute", default="none,selective,full")
    ap.add_argument("--probe", default="false,true")
    ap.add_argument("--attribute", action="store_true", help="print saved bytes by code site")
    ap.add_argument("--out", default=None, help="append JSON rows here")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    names = args.layouts.split(",") if args.layouts else DRIVER_LAYOUTS[world]
    results = []
    for name in names:
        for model_name in args.models.split(","):
            for recompute in args.recompute.split(","):
                for probe in args.probe.split(","):
                    r = _run_one(name, model_name, recompute, probe == "true", args.attribute)
                    results.append(r)
                    if dist.get_rank() == 0:
                        worst = max(r["ranks"], key=lambda x: abs(x[3] / x[2] - 1))
                        peak_meas = max(x[2] for x in r["ranks"])
                        peak_plan = max(x[3] for x in r["ranks"])
                        print(f"| {name} | {model_name} | {recompute} | {'on' if r['probe'] else 'off'}"
                              f" | {peak_meas} | {peak_plan} | {peak_plan / peak_meas:.3f} |"
                              f" worst rank {worst[0]} (pp{worst[1]}): {worst[2]} vs {worst[3]}"
                              f" = {worst[3] / worst[2]:.3f}", flush=True)
    if args.out and dist.get_rank() == 0:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
