"""`k2m-plan`: whether a layout fits, and what it costs, before anyone spends GPU hours.

    k2m-plan --config C --world-size N [--gpu-mem-gb G] [--headroom F] [--set k=v ...]
             [--gpus-per-node 8] [--peak-tflops T] [--nvlink-gbps B] [--ib-gbps B]
             [--device gpu|cpu] [--search [--top 10]] [--json]

Memory per pipeline rank (parameters, gradient buffers, optimizer state, activations),
communication per step by kind, an ideal step time, and warnings. No process group, no torch.
Exit status: 0 when the plan fits (with --search: when some layout fits), 1 when not, 2 for bad
input (the same one-line errors as `k2m-train --check`).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

PROG = "k2m-plan"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0].strip("`: "))
    p.add_argument("--config", default="k2-tiny", metavar="NAME|PATH",
                   help="preset name or YAML file (default: k2-tiny)")
    p.add_argument("--world-size", type=int, required=True, metavar="N", help="GPUs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set parallel.tp=2 (repeatable)")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, metavar="G",
                   help="memory per GPU in GiB, as nvidia-smi reports (default: 80)")
    p.add_argument("--headroom", type=float, default=0.10, metavar="F",
                   help="fraction of G kept free (default: 0.10)")
    p.add_argument("--gpus-per-node", type=int, default=8, metavar="K",
                   help="GPUs per node: groups inside a node use NVLink (default: 8)")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="T",
                   help="dense bf16 TFLOP/s per GPU (default: logging.peak_tflops)")
    p.add_argument("--nvlink-gbps", type=float, default=450.0, metavar="B",
                   help="NVLink GB/s per GPU, one direction (default: 450)")
    p.add_argument("--ib-gbps", type=float, default=50.0, metavar="B",
                   help="InfiniBand GB/s per GPU (default: 50, one 400 Gb/s NIC)")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                   help="gpu: bf16 weights (train.dtype auto), TE fused attention; cpu: fp32, "
                        "k2mcore's local attention (what the CPU proofs run)")
    p.add_argument("--attention", choices=["auto", "fused", "local"], default="auto",
                   help="attention priced: fused (Transformer-Engine), local (k2mcore's: plain, "
                        "or blockwise from the gathered latent at CP > 1 and past "
                        "model.attention_block_size tokens); auto: fused on gpu, local on cpu")
    p.add_argument("--search", action="store_true",
                   help="rank the valid layouts of N GPUs that fit by ideal step time")
    p.add_argument("--cp-sweep", action="store_true",
                   help="plan the layout at CP 1, 2, 4, 8 and 16 (the world grows with cp, the "
                        "other sizes kept) and name the smallest CP that fits")
    p.add_argument("--top", type=int, default=10, help="layouts --search prints (default: 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def _check_args(args: argparse.Namespace) -> Optional[str]:
    for name, value in (("--world-size", args.world_size), ("--gpu-mem-gb", args.gpu_mem_gb),
                        ("--gpus-per-node", args.gpus_per_node), ("--nvlink-gbps", args.nvlink_gbps),
                        ("--ib-gbps", args.ib_gbps), ("--top", args.top)):
        if not value > 0:
            return f"{name} must be > 0, got {value:g}"
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        return f"--peak-tflops must be > 0, got {args.peak_tflops:g}"
    if not 0 <= args.headroom < 1:
        return f"--headroom must be in [0, 1), got {args.headroom:g}"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # usage errors exit 2
    problem = _check_args(args)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2

    from k2mcore.config.loader import load_config
    from k2mcore.errors import K2Error
    from k2mcore.parallel.layout import resolve_layout
    from k2mcore.plan import PlanOptions, make_plan, report
    from k2mcore.plan.search import search
    from k2mcore.plan.timing import Links

    if args.search and args.cp_sweep:
        print(f"{PROG}: error: --search and --cp-sweep: pick one", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        layout = None if args.search else resolve_layout(cfg, args.world_size)
    except K2Error as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    links = Links(peak_tflops=args.peak_tflops or cfg.logging.peak_tflops,
                  nvlink_gbps=args.nvlink_gbps, ib_gbps=args.ib_gbps,
                  gpus_per_node=args.gpus_per_node)
    options = PlanOptions(gpu_mem_gib=args.gpu_mem_gb, headroom=args.headroom,
                          device=args.device, links=links,
                          attention_path=None if args.attention == "auto" else args.attention)
    if args.cp_sweep:
        from k2mcore.plan.planner import cp_sweep

        rows = cp_sweep(cfg, args.world_size, options)
        if args.json:
            print(json.dumps([{"cp": r.cp, "world_size": r.world_size, "error": r.error,
                               "plan": r.plan.to_json() if r.plan else None} for r in rows],
                             indent=1))
        else:
            print(report.cp_sweep_table(cfg, options, rows))
        return 0 if any(r.plan is not None and r.plan.fits for r in rows) else 1
    if args.search:
        plans, considered, screened = search(cfg, args.world_size, options, top=args.top)
        if args.json:
            print(json.dumps({"considered": considered, "screened_fitting": screened,
                              "plans": [p.to_json() for p in plans]}, indent=1))
        else:
            print(report.search_table(cfg, args.world_size, options, plans, considered, screened))
        return 0 if plans else 1
    plan = make_plan(cfg, layout, options)
    print(json.dumps(plan.to_json(), indent=1) if args.json else report.text(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
