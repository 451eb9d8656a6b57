"""Launching worker scripts as 1 process or under torchrun, for the multi-rank tests."""
from __future__ import annotations

import os
import subprocess
import sys


def launch(script: str, args: list[str], nproc: int, *, what: str, timeout: int = 900) -> str:
    """Run `script args` on `nproc` gloo ranks (plain process for 1); return its stdout.

    One thread per rank: the ranks share the machine's cores.
    """
    cmd = [sys.executable, script, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout
