"""Test-only launcher: k2m-rl's own entry point, killed with SIGKILL at a step.

    python tests/harness/k2m_rl_faults.py --kill-at-step 4 -- <k2m-rl arguments>

Every rank kills itself (kill -9: no handler, no save, no clean-up) right after the backward of
optimizer step N, in the middle of an iteration, as a lost node would stop; the production loop
reads no test hook (k2mcore.training.faults is the seam).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass

from k2mcore.cli.rl import main
from k2mcore.training.faults import Faults


@dataclass(frozen=True)
class KillAt(Faults):
    step: int = 0

    def loss(self, step: int, loss: float) -> float:
        if step == self.step:
            print(f"k2m_rl_faults: kill -9 at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().loss(step, loss)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="k2m_rl_faults")
    parser.add_argument("--kill-at-step", type=int, required=True)
    args, rest = parser.parse_known_args()
    if rest[:1] == ["--"]:
        rest = rest[1:]
    sys.exit(main(rest, faults=KillAt(step=args.kill_at_step)))
