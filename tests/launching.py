"""Launching worker scripts as 1 process or under torchrun, for the multi-rank tests."""
from __future__ import annotations

import subprocess

from k2mcore.parallel.local_launch import local_command, local_env


def launch(script: str, args: list[str], nproc: int, *, what: str, timeout: int = 900) -> str:
    """Run `script args` on `nproc` gloo ranks (plain process for 1); return its stdout."""
    proc = subprocess.run(local_command(nproc, script, args), env=local_env(),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout
