"""Walking megatron's optimizer: a ChainedOptimizer of children (dense and expert parameters at
EP>1), or one optimizer; each child wraps an inner torch optimizer (`child.optimizer`)."""
from __future__ import annotations

from typing import Any, Optional


def child_optimizers(optimizer: Any) -> list:
    """megatron's per-buffer optimizers (DistributedOptimizer or Float16/FP32 ones), in order."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def inner_optimizers(optimizer: Any) -> list:
    """The torch optimizers megatron's children drive (torch AdamW, or k2mcore's ShardedMuonClip)."""
    return [child.optimizer for child in child_optimizers(optimizer)]


def qk_clip_hook(optimizer: Any) -> Optional[Any]:
    """The ShardedQKClip that MuonClip runs after each step, or None (AdamW, or QK-Clip off)."""
    from k2mcore.optim.muonclip.qk_clip import ShardedQKClip

    for inner in inner_optimizers(optimizer):
        for hook in getattr(inner, "post_step_hooks", ()):
            if isinstance(hook, ShardedQKClip):
                return hook
    return None
