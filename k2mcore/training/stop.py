"""Preemption: SIGTERM (Slurm's kill) and SIGUSR1 only set a flag, and so does a stop file
(written by slurm/train.sbatch when Slurm warns the batch shell: torchrun would kill its workers
30 s after forwarding a signal, too soon for a large save). The loop finishes its step, saves and
exits 0."""
from __future__ import annotations

import os
import signal
from typing import Optional

import torch
import torch.distributed as dist

from k2mcore import platform

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Remembers a stop signal or file; `requested()` agrees across ranks (any rank counts)."""

    def __init__(self, stop_file: Optional[str] = None) -> None:
        self.signum: Optional[int] = None
        self.stop_file = stop_file
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def consume_file(self) -> bool:
        """Remove the stop file once the stop it asked for is done (saved), so that the next
        start of the run does not stop again after one step; True if there was one."""
        if not self.stop_file:
            return False
        try:
            os.remove(self.stop_file)
            return True
        except FileNotFoundError:
            return False

    def requested(self) -> bool:
        local = self.signum is not None or bool(self.stop_file and os.path.exists(self.stop_file))
        flag = torch.tensor([1.0 if local else 0.0], device=platform.device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
