"""Validation loss: the masked mean token loss over the first `train.eval_iters` global batches
of the valid split, in every layout the same number (sums and counts over the whole set, not a
mean of batch means)."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch


@contextmanager
def held_out(model: list) -> Iterator[None]:
    """Eval mode, no autograd (the MoE router counts tokens for its bias update only with grad
    enabled), and the attention-logit probes of the training step set aside, so QK-Clip sees
    only the training forward's logits."""
    probes = {m: m.current_max_attn_logits for c in model for m in c.modules()
              if hasattr(m, "current_max_attn_logits")}
    for m in probes:
        m.current_max_attn_logits = None
    for c in model:
        c.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for c in model:
            c.train()
        for m, value in probes.items():
            m.current_max_attn_logits = value


def evaluate(model: list, groups: Any, batches: Callable[[], Iterator[dict]], *,
             eval_iters: int, num_microbatches: int, seq_length: int,
             micro_batch_size: int, packed: bool = False) -> dict:
    """{"val_loss", "val_ppl"} over `eval_iters` global batches from `batches()` (a fresh
    iterator over this DP rank's valid micro-batches; `packed`: rows of packed conversations).
    Collective."""
    from k2mcore.parallel.ddp import sync_params

    from .step import loss_totals

    sync_params(model)  # overlap_param_gather: evaluate the stepped weights on every rank
    total = count = 0.0
    it = batches()
    try:
        with held_out(model):
            for _ in range(eval_iters):
                micro = [next(it) for _ in range(num_microbatches)]
                t, c = loss_totals(model, groups, micro, seq_length=seq_length,
                                   micro_batch_size=micro_batch_size, forward_only=True,
                                   packed=packed)
                total, count = total + t, count + c
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    loss = total / count if count else float("nan")
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
