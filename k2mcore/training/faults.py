"""Preemption signals and non-finite steps.

SIGTERM (Slurm's kill) and SIGUSR1 only set a flag, and so does a stop file (written by
slurm/train.sbatch when Slurm warns the batch shell: torchrun would kill its workers 30 s after
forwarding a signal, too soon for a large save); the loop finishes its step, saves and exits 0. A non-finite loss or gradient norm skips the update, and
too many in a row stop the run with a message instead of training on garbage.
"""
from __future__ import annotations

import math
import os
import signal
from typing import Optional

import torch
import torch.distributed as dist

from k2mcore import platform

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Testing hook: comma-separated steps whose loss is replaced by NaN (after backward), so the
# skip path runs end to end in tests without hand-crafting a diverging model.
NAN_STEPS_ENV = "K2M_FAULT_NAN_STEPS"


class TooManySkippedSteps(RuntimeError):
    pass


class StopRequest:
    """Remembers a stop signal or file; `requested()` agrees across ranks (any rank counts)."""

    def __init__(self, stop_file: Optional[str] = None) -> None:
        self.signum: Optional[int] = None
        self.stop_file = stop_file
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def requested(self) -> bool:
        local = self.signum is not None or bool(self.stop_file and os.path.exists(self.stop_file))
        device = platform.device()
        flag = torch.tensor([1.0 if local else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def injected_nan_steps() -> set[int]:
    text = os.environ.get(NAN_STEPS_ENV, "")
    return {int(s) for s in text.split(",") if s.strip()}


def optimizer_step(optimizer, loss: float) -> tuple[bool, float]:
    """megatron's optimizer step, skipped when the loss or the gradient norm is not finite.

    Mirrors megatron's ChainedOptimizer.step (prepare grads, one global norm, clip by it, step)
    with the finiteness check megatron leaves to Megatron-LM's training loop.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():  # fp16 loss scaler found an inf
        return False, float("nan")
    norm = float(optimizer.get_grad_norm())
    if not (math.isfinite(loss) and math.isfinite(norm)):
        return False, norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=norm)
    return bool(optimizer.step_with_ready_grads()), norm


class SkipCounter:
    """Counts skipped updates; raises after `limit` consecutive ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.in_a_row = 0

    def update(self, ok: bool, step: int, loss: float, grad_norm: float) -> None:
        if ok:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise TooManySkippedSteps(
                f"step {step}: {self.in_a_row} updates in a row skipped for a non-finite loss "
                f"or gradient norm (loss {loss}, grad norm {grad_norm}); stopping "
                f"(train.max_consecutive_skips={self.limit})"
            )
