"""The loop's fault-injection seam. Production runs pass nothing (`Faults()` injects nothing);
tests hand `train()` a `Faults` to drive failure paths end to end, such as a run of non-finite
losses through the skip-step logic, without hand-crafting a diverging model."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    nan_loss_steps: frozenset[int] = frozenset()  # steps whose loss becomes NaN after backward

    def loss(self, step: int, loss: float) -> float:
        return float("nan") if step in self.nan_loss_steps else loss
