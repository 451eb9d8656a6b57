"""`k2m-rl`: the colocated, synchronous RL loop (generate -> reward -> update -> sync) on the
trainer's ranks; a preset or YAML file with `--set` overrides, as k2m-train (docs/rl.md)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

PROG = "k2m-rl"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Reinforcement learning on a K2-class "
                                "MoE model: generate, reward, update, sync.")
    p.add_argument("--config", required=True, metavar="NAME|PATH",
                   help="preset name or YAML file, with an rl section and rl.prompts")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set rl.samples=8 (repeatable)")
    return p


def main(argv: Optional[list[str]] = None, *, faults=None) -> int:
    """k2m-rl. `faults`: a fault plan for tests (k2mcore.training.faults), else None."""
    args = _parser().parse_args(argv)

    from k2mcore.config.loader import load_config
    from k2mcore.errors import K2Error
    from k2mcore.parallel.layout import resolve_layout

    try:
        cfg = load_config(args.config, args.overrides)
        layout = resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        from k2mcore.rl.loop import Plan

        Plan.from_config(cfg)  # prompts, reward, sizes: one line before torch and megatron start
    except K2Error as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from k2mcore.rl.loop import rl_train

    from .exits import run_to_exit

    return run_to_exit(PROG, lambda: rl_train(cfg, layout, faults=faults))


if __name__ == "__main__":
    raise SystemExit(main())
