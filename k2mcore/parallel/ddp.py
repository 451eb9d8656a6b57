"""megatron-core's DistributedDataParallel around the model chunks, and the layout of its
gradient buffers: the one place that decides how parameters lie in DDP's flat buffers, which is
also how the distributed optimizer shards them (torchtitan's `parallelize` plays this role).

Two layouts: megatron's own (the distributed optimizer's equal ZeRO-1 slices), or MuonClip's
owner-aligned one (k2mcore.optim.muonclip.owner_layout), which puts every Muon matrix whole in
the shard of the rank that orthogonalizes it. `ddp_param_layout` picks from the config;
`wrap_ddp` builds DDP with it.
"""
from __future__ import annotations

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
                              wire_bytes=MuonHyperParams.from_config(m).wire_dtype().itemsize)


def wrap_ddp(chunks: Sequence[torch.nn.Module], groups: ProcessGroups, *,
             distributed_optimizer: bool, param_layout: Optional[Any] = None) -> list:
    """megatron DDP around each chunk (fp32 grad buffers), hooked into the schedules.

    `param_layout`: lays out the buffers instead of megatron's distributed optimizer
    (k2mcore.optim.muonclip.owner_layout.OwnerAlignedLayout, for MuonClip)."""
    config = get_model_config(chunks[0])
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    model = []
    for i, chunk in enumerate(chunks):
        layout = (param_layout.layout(i, chunk, ddp_config) if param_layout is not None
                  else _megatron_layout(chunk, ddp_config, groups))
        model.append(DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk,
            # only the first chunk's buckets start the first all-reduce (as Megatron-LM does)
            disable_bucketing=i > 0, full_param_layout=layout))
        if param_layout is not None:
            param_layout.register(i, model[-1])
    config.finalize_model_grads_func = finalize_model_grads
    return model


def _megatron_layout(chunk: torch.nn.Module, ddp_config: DistributedDataParallelConfig,
                  groups: ProcessGroups):
    """The distributed optimizer's parameter layout, computed before DDP as megatron 0.19 asks
    (DDP otherwise computes the same one itself and warns). One bucket per buffer: k2mcore does
    not overlap the gradient reduction (`overlap_grad_reduce=False` makes DDP's bucket size
    None)."""
    if not ddp_config.use_distributed_optimizer:
        return None
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    params = [p for p in chunk.parameters() if p.requires_grad]
    layout = groups.layout
    return DistributedOptimizer.compute_full_param_layout(
        params, None, layout.dp * layout.cp, ddp_config,
        expert_data_parallel_world_size=layout.expert_dp)
