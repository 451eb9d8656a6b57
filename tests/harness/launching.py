"""Launching scripts on several ranks of this machine (1 process, or torchrun --standalone), for
the multi-rank tests and the benchmarks (which put tests/ on sys.path to share it)."""
from __future__ import annotations

import os
import subprocess
import sys

#: k2m-train's entry point behind a fault plan (tests/harness/k2m_train_faults.py)
K2M_TRAIN_FAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "k2m_train_faults.py")


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


def launch(script: str, args: list[str], nproc: int, *, what: str, timeout: int = 900) -> str:
    """Run `script args` on `nproc` gloo ranks (plain process for 1); return its stdout."""
    proc = subprocess.run(local_command(nproc, script, args), env=local_env(),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def free_port() -> int:
    """A TCP port free on loopback right now (a rendezvous port for a launch)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
