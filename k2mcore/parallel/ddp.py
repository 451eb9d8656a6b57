"""megatron-core's DistributedDataParallel around the model chunks, and the layout of its
gradient buffers: the one place that decides how parameters lie in DDP's flat buffers, which is
also how the distributed optimizer shards them (torchtitan's `parallelize` plays this role).

Two layouts: megatron's own (the distributed optimizer's equal ZeRO-1 slices), or MuonClip's
owner-aligned one (k2mcore.optim.muonclip.owner_layout), which puts every Muon matrix whole in
the shard of the rank that orthogonalizes it. `ddp_param_layout` picks from the config;
`wrap_ddp` builds DDP with it, and with `Overlap` wires what Megatron-LM's training loop wires for
overlapped data-parallel communication (docs/training.md, 'Overlapped data-parallel
communication'); `sync_params` completes the parameter all-gather where the next forward would
have (before a checkpoint save, an evaluation, or reading the weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.utils import get_model_config

from k2mcore.config.schema import K2Config
from k2mcore.parallel.groups import ProcessGroups


@dataclass(frozen=True)
class Overlap:
    """Data-parallel communication overlapped with compute (train.overlap_grad_reduce,
    train.overlap_param_gather, train.ddp_bucket_size); the default overlaps nothing."""

    grad_reduce: bool = False
    param_gather: bool = False
    bucket_size: Optional[int] = None  # elements; None: megatron's max(40M, 1M x DP)

    @classmethod
    def from_config(cls, cfg: K2Config) -> "Overlap":
        """The config's switches, null resolved for this platform (resolve_overlap)."""
        from k2mcore import platform
        from k2mcore.config.schema import resolve_overlap

        t = cfg.train
        grad, param = resolve_overlap(t.overlap_grad_reduce, t.overlap_param_gather,
                                      distributed_optimizer=cfg.parallel.distributed_optimizer,
                                      cuda=platform.has_cuda())
        return cls(grad_reduce=grad, param_gather=param, bucket_size=t.ddp_bucket_size)


def ddp_param_layout(cfg: K2Config, chunks: list, groups: ProcessGroups) -> Optional[Any]:
    """How DDP lays out the buffers of the unwrapped `chunks`: MuonClip's owner-aligned shards
    (optimizer.muon.owner_aligned_shards), else None (megatron's distributed optimizer's)."""
    m = cfg.optimizer.muon
    if cfg.optimizer.name != "muonclip" or not m.owner_aligned_shards:
        return None
    from k2mcore.optim.muonclip.hparams import MuonHyperParams
    from k2mcore.optim.muonclip.owner_layout import OwnerAlignedLayout

    return OwnerAlignedLayout(chunks, groups, router_in_muon=m.router_in_muon,
                              split_gated=m.split_gated, offload_budget=m.ns_offload_budget,
                              wire_bytes=MuonHyperParams.from_config(m).wire_dtype().itemsize,
                              bucket_size=bucket_size(Overlap.from_config(cfg), groups))


def bucket_size(overlap: Overlap, groups: ProcessGroups) -> Optional[int]:
    """Elements per bucket DDP cuts the first stage's first chunk into: None (one bucket per
    buffer) without overlapped gradient reduction, else the configured size or megatron's
    default, max(40M, 1M x DP)."""
    if not overlap.grad_reduce:
        return None
    return overlap.bucket_size or max(40_000_000, 1_000_000 * groups.layout.dp * groups.layout.cp)


def wrap_ddp(chunks: Sequence[torch.nn.Module], groups: ProcessGroups, *,
             distributed_optimizer: bool, param_layout: Optional[Any] = None,
             overlap: Optional[Overlap] = None) -> list:
    """megatron DDP around each chunk (fp32 grad buffers), hooked into the schedules.

    `param_layout`: lays out the buffers instead of megatron's distributed optimizer
    (k2mcore.optim.muonclip.owner_layout.OwnerAlignedLayout, for MuonClip). `overlap`: reduce
    gradients bucket by bucket during the backward and gather parameters in the forward
    pre-hooks, with the schedules' sync functions set as Megatron-LM sets them."""
    ov = overlap or Overlap()
    config = get_model_config(chunks[0])
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=ov.grad_reduce,
        overlap_param_gather=ov.param_gather,
        # with virtual stages the interleaved schedule dispatches each chunk's gathers
        # (param_sync_func); otherwise each bucket's pre-hook dispatches the next bucket's
        align_param_gather=ov.param_gather and len(chunks) > 1,
        bucket_size=ov.bucket_size,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    model = []
    for i, chunk in enumerate(chunks):
        layout = (param_layout.layout(i, chunk, ddp_config) if param_layout is not None
                  else _megatron_layout(chunk, ddp_config, groups, bucketed=i == 0))
        model.append(DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk,
            # only the first chunk's buckets start the first all-reduce (as Megatron-LM does)
            disable_bucketing=i > 0, full_param_layout=layout))
        if param_layout is not None:
            param_layout.register(i, model[-1])
    config.finalize_model_grads_func = finalize_model_grads
    _wire_schedules(config, model, ov)
    return model


def _wire_schedules(config: Any, model: list, ov: Overlap) -> None:
    """The schedules' hooks, as megatron/training/training.py sets them: `no_sync_func` keeps
    all but the last micro-batch's backward from reducing, `grad_sync_func` starts a stage's
    reduction once its last backward ran (1F1B; the first stage reduces bucket by bucket from its
    hooks), `param_sync_func` dispatches a chunk's gathers before its first forward (the
    interleaved schedule, align_param_gather).

    With virtual stages grad_sync_func stays unset (Megatron-LM's --no-align-grad-reduce): the
    interleaved schedule then lets each chunk's last micro-batch reduce from its backward hooks,
    so the first stage's first chunk overlaps its buckets; with it set, that chunk's reduction
    would start only after its last backward, the end of the step."""
    def one_or_list(funcs: list) -> Any:
        return funcs[0] if len(funcs) == 1 else funcs

    config.no_sync_func = one_or_list([m.no_sync for m in model]) if ov.grad_reduce else None
    config.grad_sync_func = (model[0].start_grad_sync
                             if ov.grad_reduce and len(model) == 1 else None)
    config.param_sync_func = (one_or_list([m.start_param_sync for m in model])
                              if ov.param_gather and len(model) > 1 else None)


def sync_params(model: Sequence[Any]) -> None:
    """Finish the parameter all-gather now (overlap_param_gather leaves it to the next
    forward's pre-hooks): after it every rank's weights are the stepped ones. A no-op without
    overlap or with the gathers already done this step."""
    for chunk in model:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            with torch.no_grad():
                chunk.start_param_sync(force_sync=True)


def _megatron_layout(chunk: torch.nn.Module, ddp_config: DistributedDataParallelConfig,
                     groups: ProcessGroups, *, bucketed: bool):
    """The distributed optimizer's parameter layout, computed before DDP as megatron 0.19 asks
    (DDP otherwise computes the same one itself and warns), with the buckets DDP would cut:
    without overlap_grad_reduce one per buffer; with it, buckets of ddp_config.bucket_size
    (megatron's default when None) on the first pipeline stage's first chunk only."""
    if not ddp_config.use_distributed_optimizer:
        return None
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    params = [p for p in chunk.parameters() if p.requires_grad]
    layout = groups.layout
    dp = layout.dp * layout.cp
    size = None
    if bucketed and groups.pp_rank == 0:
        size = bucket_size(Overlap(grad_reduce=ddp_config.overlap_grad_reduce,
                                   bucket_size=ddp_config.bucket_size), groups)
    return DistributedOptimizer.compute_full_param_layout(
        params, size, dp, ddp_config, expert_data_parallel_world_size=layout.expert_dp)
