"""`k2m-plot`: a run's metrics.jsonl -> one PNG of loss, learning rate, grad norm (and max
attention logit)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from k2mcore.training.plot import plot_run


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="k2m-plot", description=__doc__.splitlines()[0])
    ap.add_argument("metrics", help="a run's metrics.jsonl (or its run directory)")
    ap.add_argument("-o", "--output", help="PNG path (default: metrics.png beside the input)")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    path = args.metrics
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    try:
        print(plot_run(path, args.output))
    except (OSError, ValueError) as exc:
        print(f"k2m-plot: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
