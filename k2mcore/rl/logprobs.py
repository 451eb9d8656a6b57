"""`logprobs`: the per-token log-probabilities a model in any layout gives the labels of its
micro-batches (the old-policy pass of the update, and what a user compares with an engine's)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist


def logprobs(model: Sequence[torch.nn.Module], groups: Any, micro_batches: Sequence[dict], *,
             seq_length: int, micro_batch_size: int, temperature: float = 1.0,
             packed: bool = False, replay: Any = None) -> list[torch.Tensor]:
    """log p(labels[i, j] | tokens[i, :j+1]) under softmax(logits / temperature), float32
    [mbs, seq] per micro-batch (this DP rank's), on every rank of the layout: TP (the
    vocab-parallel log-softmax), SP, PP (sent from the last stage), EP, CP (gathered to the
    sequence order). `packed`: rows of several documents (position_ids restarting at 0), run as
    one THD sequence, returned in the rows' layout as well. `replay`: the model's
    k2mcore.rl.replay.RouteReplay, replaying or recording as its mode says.

    Collective; no autograd, eval mode, and the MoE router does not count these tokens for its
    bias update; the attention probes of QK-Clip are left as they were."""
    from k2mcore.training.evaluate import held_out
    from k2mcore.training.step import run_schedule

    from .loss import RecordLogprobs

    micro_batches = list(micro_batches)
    cp = groups.cp_group if groups.layout.cp > 1 else None
    record = RecordLogprobs(temperature, groups.tp_group, cp, replay)
    with held_out(model):
        reports = run_schedule(model, groups, micro_batches, seq_length=seq_length,
                               micro_batch_size=micro_batch_size, forward_only=True,
                               packed=packed, objective=record)
    shapes = [tuple(b["tokens"].shape) for b in micro_batches]
    sizes = [a * b for a, b in shapes]
    device = micro_batches[0]["tokens"].device if micro_batches else None
    flat = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
    if groups.is_last_stage:
        # packed: [1, t] with the padding to the TP/CP multiple at the end; the rows come first
        flat = torch.cat([r["logp"].reshape(-1)[:n] for r, n in zip(reports, sizes)]) \
            if reports else flat
    if groups.layout.pp > 1:
        src = dist.get_global_rank(groups.pp_group, groups.layout.pp - 1)
        dist.broadcast(flat, src=src, group=groups.pp_group)
    return [part.reshape(shape) for part, shape in zip(flat.split(sizes), shapes)]
