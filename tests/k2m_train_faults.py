"""Test-only launcher: k2m-train's own entry point with a fault plan.

    python tests/k2m_train_faults.py --nan-loss-steps 2,3 -- <k2m-train arguments>

The production loop reads no test hook; this wraps `k2mcore.cli.train.main` and hands it
`k2mcore.training.faults.Faults`.
"""
from __future__ import annotations

import argparse
import sys

from k2mcore.cli.train import main
from k2mcore.training.faults import Faults


def _steps(text: str) -> frozenset[int]:
    return frozenset(int(s) for s in text.split(",") if s.strip())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="k2m_train_faults")
    parser.add_argument("--nan-loss-steps", type=_steps, default=frozenset())
    args, rest = parser.parse_known_args()
    if rest[:1] == ["--"]:
        rest = rest[1:]
    sys.exit(main(rest, faults=Faults(nan_loss_steps=args.nan_loss_steps)))
