"""`k2m-train`: load a preset or YAML file, apply `--set` overrides, validate, train.

`--check` prints the resolved parallel layout and parameter counts and exits; it imports neither
torch nor megatron, so it runs in well under a second on a login node.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

PROG = "k2m-train"


def human(n: float) -> str:
    """1.03T / 32.9B / 2.1B / 45.3M style, three significant digits."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Train a Kimi-K2-class MoE model.")
    p.add_argument("--config", default="k2-tiny", metavar="NAME|PATH",
                   help="preset name (k2mcore/config/presets) or YAML file (default: k2-tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set parallel.tp=2 (repeatable)")
    p.add_argument("--check", action="store_true",
                   help="validate, print the parallel layout and parameter counts, and exit")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="ranks to validate for (default: $WORLD_SIZE or 1)")
    return p


def _world_size(parser: argparse.ArgumentParser, arg: Optional[int]) -> int:
    if arg is not None:
        return arg
    env = os.environ.get("WORLD_SIZE", "1")
    if not env.strip().lstrip("-").isdigit():
        parser.error(f"environment WORLD_SIZE={env!r} is not an integer")  # exits 2
    return int(env)


def report(cfg, layout) -> str:
    """The --check summary."""
    from k2mcore.parallel.param_counts import count_parameters, params_per_rank

    counts = count_parameters(cfg.model)
    lo, hi = params_per_rank(cfg, layout)
    t = cfg.train
    vpp = layout.vpp if layout.vpp is not None else "-"
    tokens = t.global_batch_size * t.seq_length
    return "\n".join([
        f"config: {cfg.model.name}  world size {layout.world_size}",
        f"parallel: TP={layout.tp} PP={layout.pp} VPP={vpp} EP={layout.ep} ETP={layout.etp} "
        f"CP={layout.cp} DP={layout.dp} expert-DP={layout.expert_dp} "
        f"SP={'on' if layout.sp else 'off'}",
        f"batch: {t.global_batch_size} x {t.seq_length} = {human(tokens)} tokens per step, "
        f"{layout.num_microbatches} microbatches of {t.micro_batch_size} per DP rank",
        f"layers per stage: {layout.describe_stages()}",
        f"params: total {human(counts['total'])}, active {human(counts['active'])} per token "
        f"({human(counts['active_non_embedding'])} without embedding/output)",
        f"params per rank: min {human(lo)}, max {human(hi)}",
    ])


def main(argv: Optional[list[str]] = None, *, faults=None) -> int:
    """k2m-train. `faults`: a fault plan for tests (tests/harness/k2m_train_faults.py), else
    None."""
    parser = _parser()
    args = parser.parse_args(argv)  # usage errors exit 2
    world_size = _world_size(parser, args.world_size)

    from k2mcore.config.loader import load_config
    from k2mcore.errors import K2Error
    from k2mcore.parallel.layout import resolve_layout

    try:
        cfg = load_config(args.config, args.overrides)
        layout = resolve_layout(cfg, world_size)  # validates
    except K2Error as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(report(cfg, layout))
        return 0
    # megatron's import-time notices are filtered by compat.preimport, on its first import
    from k2mcore.training import train  # heavy (torch, megatron): only when training

    from .exits import run_to_exit

    return run_to_exit(PROG, lambda: train(cfg, layout, faults=faults))


if __name__ == "__main__":
    raise SystemExit(main())
