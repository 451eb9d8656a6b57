"""One forward/backward over this rank's micro-batches with megatron-core's schedules, on the
DDP-wrapped chunks (k2mcore.parallel.ddp)."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from k2mcore import platform
from k2mcore.parallel.groups import ProcessGroups


# (batch, logits) -> (loss sum, count as an int tensor, report of tensors): megatron's per-token
# loss convention, for losses other than the token cross-entropy (k2mcore.rl)
Objective = Callable[[dict, torch.Tensor], tuple]


def _loss(loss_mask: torch.Tensor, per_token: torch.Tensor):
    """(sum of masked token losses, token count, report) — megatron's per-token convention."""
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(per_token.float().reshape(-1) * mask)
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), mask.sum()])}


def packed_length(seq_length: int, micro_batch_size: int, multiple: int = 1) -> int:
    """Tokens of a packed micro-batch: its rows end to end, padded to `multiple`."""
    return -(-seq_length * micro_batch_size // multiple) * multiple


def pack_micro_batch(batch: dict, multiple: int = 1, cp: int = 1) -> dict:
    """A packed micro-batch ([mbs, s] rows whose position_ids restart at 0 at every document,
    the row-end padding included) as megatron's THD batch: fields [1, t], the rows end to end,
    padded to a multiple of `multiple` with one more masked segment (sequence parallelism
    splits t over TP), and "packed_seq_params" with the document boundaries.

    `cp` > 1: every document must already be padded to a multiple of 2·cp (the packed chat
    dataset does it: k2mcore.data.chat.dataset); the boundaries are also megatron's
    `cu_seqlens_q_padded`, which its THD rope and TE's CP attention read."""
    from k2mcore.model.packing import cu_seqlens_from_positions, packed_seq_params

    flat = {k: batch[k].reshape(1, -1) for k in ("tokens", "labels", "loss_mask",
                                                 "position_ids")}
    n = flat["tokens"].shape[1]
    pad = packed_length(n, 1, multiple) - n
    if pad:
        device = flat["tokens"].device
        extra = {"tokens": torch.zeros(1, pad, dtype=torch.int64, device=device),
                 "labels": torch.zeros(1, pad, dtype=torch.int64, device=device),
                 "loss_mask": torch.zeros(1, pad, dtype=flat["loss_mask"].dtype, device=device),
                 "position_ids": torch.arange(pad, device=device)[None]}
        flat = {k: torch.cat([v, extra[k].to(v.dtype)], dim=1) for k, v in flat.items()}
    cu = cu_seqlens_from_positions(flat["position_ids"])
    params = packed_seq_params(cu, n + pad)
    if cp > 1:  # (the split, k2mcore.parallel.context, refuses a document it cannot halve)
        params.cu_seqlens_q_padded = params.cu_seqlens_kv_padded = cu
    return {**flat, "packed_seq_params": params}


def _forward_step(data_iterator, model, *, packed: bool = False, multiple: int = 1,
                  cp_group=None, objective: Optional[Objective] = None):
    batch = source = next(data_iterator)
    cp = cp_group.size() if cp_group is not None else 1
    if packed:
        from k2mcore.parallel.context import split_packed_batch

        batch = pack_micro_batch(batch, multiple, cp)
        # chunks r and 2cp-1-r of every document; the model gets the whole sequence's
        # boundaries, as megatron's THD convention with CP has it
        bounds = batch["packed_seq_params"].cu_seqlens_q.tolist()
        batch = {**split_packed_batch(batch, bounds, cp_group), "cp_bounds": bounds}
        positions, extra = batch["position_ids"], {
            "packed_seq_params": batch["packed_seq_params"]}
    else:
        if cp > 1:
            # megatron's load-balanced split (chunks r and 2cp-1-r of every sequence); the model
            # (rope, k2mcore's MLA or TE's CP attention) knows the positions from the CP rank
            from k2mcore.parallel.context import split_batch

            batch = split_batch(batch, cp_group)
        tokens = batch["tokens"]
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        extra = {}
    if objective is not None:  # the logits (vocab-parallel under TP) go to the objective
        begin = getattr(objective, "begin", None)  # a per-micro-batch context (routing replay)
        if begin is not None:
            begin(batch, source)
        output = model(batch["tokens"], positions, None, **extra)
        if begin is not None:
            output = objective.wrap(output)
        return output, partial(objective, batch)
    output = model(batch["tokens"], positions, None, labels=batch["labels"], **extra)
    return output, partial(_loss, batch["loss_mask"])


def forward_backward(model: Sequence[torch.nn.Module], groups: ProcessGroups,
                     micro_batches: Iterable[dict], **schedule: Any) -> float:
    """Run the schedule over `micro_batches` (dicts of tokens/labels/loss_mask, [mbs, seq]);
    `schedule`: `loss_totals`' keywords (seq_length, micro_batch_size, forward_only, packed).

    Gradients land in each parameter's `main_grad`, already reduced over data parallelism and
    divided by the global batch's unmasked-token count (megatron's per-token loss). Returns that
    token-averaged loss over the global batch (every rank gets the same value).
    """
    total, count = loss_totals(model, groups, micro_batches, **schedule)
    # no unmasked token (every assistant turn truncated away): a non-finite loss, which the
    # skip-step logic turns into a skipped step
    return total / count if count else float("nan")


def loss_totals(
    model: Sequence[torch.nn.Module],
    groups: ProcessGroups,
    micro_batches: Iterable[dict],
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    packed: bool = False,
) -> tuple[float, float]:
    """megatron's schedule over `micro_batches`; returns (sum of masked token losses, unmasked
    tokens) over the global batch, the same on every rank.

    `packed`: each row holds several documents, told apart by position_ids restarting at 0
    (k2mcore.data.chat.packing); a micro-batch runs as one THD sequence of its rows end to end.
    """
    reports = run_schedule(model, groups, micro_batches, seq_length=seq_length,
                           micro_batch_size=micro_batch_size, forward_only=forward_only,
                           packed=packed)
    totals = reduce_reports(groups, [r["lm loss"] for r in reports], 2)
    return float(totals[0]), float(totals[1])


def run_schedule(
    model: Sequence[torch.nn.Module],
    groups: ProcessGroups,
    micro_batches: Iterable[dict],
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    packed: bool = False,
    objective: Optional[Objective] = None,
) -> list[dict]:
    """megatron's schedule over `micro_batches` with the token loss, or with `objective` on the
    logits; returns the loss function's reports, one per micro-batch, on the last pipeline
    stage (none elsewhere)."""
    micro_batches = list(micro_batches)
    cp_group = groups.cp_group if groups.layout.cp > 1 else None
    step = partial(_forward_step, cp_group=cp_group, objective=objective)
    if packed:
        # THD is [t, 1, hidden]: the pipeline's p2p shape is one sequence of the packed length
        # (with CP, each of the cp ranks' t / cp tokens split over TP; documents come padded to
        # 2·cp, so a final segment is one too)
        multiple = packed_multiple(groups)
        step = partial(_forward_step, packed=True, multiple=multiple, cp_group=cp_group,
                       objective=objective)
        seq_length = packed_length(seq_length, micro_batch_size, multiple)
        micro_batch_size = 1
    if not forward_only:
        for chunk in model:
            if hasattr(chunk, "zero_grad_buffer"):
                chunk.zero_grad_buffer()
    iterators = [iter(micro_batches) for _ in model]
    reports = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=list(model) if len(model) > 1 else model[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return list(reports) if groups.is_last_stage else []


def packed_multiple(groups: ProcessGroups) -> int:
    """What a packed micro-batch's length is padded to: TP under SP, times 2·cp."""
    layout = groups.layout
    return (layout.tp if layout.sp else 1) * (2 * layout.cp if layout.cp > 1 else 1)


def reduce_reports(groups: ProcessGroups, values: Sequence[torch.Tensor], size: int,
                   op: Any = None) -> torch.Tensor:
    """The micro-batches' report tensors (`size` values each, on the last pipeline stage) added,
    then reduced over pipeline, tensor and data x context parallelism (`op`: dist.ReduceOp.SUM
    by default; MAX for maxima of non-negative values): float64 [size], the same on every rank.
    TP ranks hold copies, so only TP rank 0's count; CP ranks hold different tokens."""
    op = dist.ReduceOp.SUM if op is None else op
    device = platform.device()
    totals = torch.zeros(size, dtype=torch.float64, device=device)
    for value in values:
        v = value.double().to(device)
        totals = torch.maximum(totals, v) if op == dist.ReduceOp.MAX else totals + v
    if groups.tp_rank != 0:
        totals.zero_()
    for group in (groups.pp_group, groups.tp_group, groups.dp_cp_group):
        dist.all_reduce(totals, op=op, group=group)
    return totals
