"""megatron's optimizer step, skipped when the loss or the gradient norm is not finite; too many
skips in a row stop the run with a message instead of training on garbage."""
from __future__ import annotations

import math
from typing import Any

from k2mcore.errors import TooManySkippedSteps

from .chain import child_optimizers


class SkippingStep:
    """`step(loss, step_number) -> (applied, grad_norm)` around megatron's optimizer.

    Mirrors megatron's ChainedOptimizer.step (prepare grads, one global norm, clip by it, step)
    with the finiteness check megatron leaves to Megatron-LM's training loop.
    """

    def __init__(self, optimizer: Any, max_consecutive: int) -> None:
        self.optimizer = optimizer
        self.limit = max_consecutive
        self.total = 0  # skipped steps in this process's run
        self.in_a_row = 0

    def step(self, loss: float, step: int) -> tuple[bool, float]:
        ok, norm = self._step(loss)
        if ok:
            self.in_a_row = 0
            return ok, norm
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise TooManySkippedSteps(
                f"step {step}: {self.in_a_row} updates in a row skipped for a non-finite loss "
                f"or gradient norm (loss {loss}, grad norm {norm}); stopping "
                f"(train.max_consecutive_skips={self.limit})"
            )
        return ok, norm

    def _step(self, loss: float) -> tuple[bool, float]:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        if self.optimizer.prepare_grads():  # fp16 loss scaler found an inf
            return False, float("nan")
        norm = float(self.optimizer.get_grad_norm())
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return False, norm
        for opt in child_optimizers(self.optimizer):
            params = opt.get_parameters()
            if params and opt.config.clip_grad > 0.0:
                clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad,
                                             total_norm=norm)
        return bool(self.optimizer.step_with_ready_grads()), norm
