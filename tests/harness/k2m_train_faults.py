"""Test-only launcher: k2m-train's own entry point with a fault plan.

    python tests/harness/k2m_train_faults.py --nan-loss-steps 2,3 -- <k2m-train arguments>
    python tests/harness/k2m_train_faults.py --stall-async-save-from 4 -- <k2m-train arguments>

The production loop reads no test hook; this wraps `k2mcore.cli.train.main` and hands it
`k2mcore.training.faults.Faults`. `--stall-async-save-from N`: the background writer of every
async save of step N or later stops for good after its first write, so that a test can kill the
run while a checkpoint is half written.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

from k2mcore.cli.train import main
from k2mcore.training.faults import Faults


def _steps(text: str) -> frozenset[int]:
    return frozenset(int(s) for s in text.split(",") if s.strip())


def _stall_async_writes(from_step: int) -> None:
    from k2mcore.checkpoint import writer

    write = writer.ChecksummingStream.write

    def stalling(self, data):
        n = write(self, data)
        name = threading.current_thread().name  # k2mcore.checkpoint.pending's "k2m-save-<step>"
        if name.startswith("k2m-save-") and int(name.rsplit("-", 1)[1]) >= from_step:
            print(f"k2m_train_faults: {name} stalls mid-file", flush=True)
            time.sleep(3600)
        return n

    writer.ChecksummingStream.write = stalling


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="k2m_train_faults")
    parser.add_argument("--nan-loss-steps", type=_steps, default=frozenset())
    parser.add_argument("--stall-async-save-from", type=int, default=0)
    args, rest = parser.parse_known_args()
    if args.stall_async_save_from:
        _stall_async_writes(args.stall_async_save_from)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    sys.exit(main(rest, faults=Faults(nan_loss_steps=args.nan_loss_steps)))
