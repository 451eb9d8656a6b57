"""Command lines for several ranks on this machine (tests, benchmarks, dry runs)."""
from __future__ import annotations

import os
import sys


def local_command(nproc: int, program: str, args: list[str]) -> list[str]:
    """`program args` (a Python script or console script) on `nproc` ranks of this machine:
    a plain process for 1, torchrun --standalone (free rendezvous port) otherwise."""
    if nproc == 1:
        return [sys.executable, program, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", program, *args]


def local_env(**extra: str) -> dict[str, str]:
    """One thread per rank (ranks share the cores), quiet imports, this venv's scripts first."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.update(extra)
    return env
