"""Process groups for a resolved `Layout`: torch.distributed, then megatron's parallel_state.

`init_distributed(layout)` returns `ProcessGroups`: the layout plus this rank's coordinates and
groups, read from megatron's parallel_state once. k2mcore's own code takes that object instead of
asking the globals again; megatron's modules still read parallel_state themselves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from k2mcore import platform
from k2mcore.parallel.layout import Layout, megatron_sizes


@dataclass(frozen=True)
class ProcessGroups:
    """This rank's place in `layout` and the groups k2mcore reduces over."""

    layout: Layout
    rank: int
    tp_rank: int
    pp_rank: int
    ep_rank: int
    etp_rank: int
    dp_rank: int  # data parallel, without context parallelism (what the data loader splits)
    dp_cp_rank: int  # data x context parallel (what the distributed optimizer shards over)
    cp_rank: int  # context parallel: which load-balanced chunks of each sequence it holds
    tp_group: Any
    pp_group: Any
    dp_group: Any
    dp_cp_group: Any
    cp_group: Any
    expert_dp_group: Any

    @property
    def is_last_stage(self) -> bool:
        """This pipeline rank holds the loss (in its last virtual chunk)."""
        return self.pp_rank == self.layout.pp - 1

    def holds(self, char: str, vp_stage: int = 0) -> bool:
        """Whether this rank's chunk `vp_stage` holds layout character `char` (E or L)."""
        return char in self.layout.stages[self.pp_rank][vp_stage]


#: the megatron sizes the current parallel_state groups were built for (megatron keeps the groups
#: themselves in its own module globals; this only says for which layout)
_built_for: dict[str, Any] = {}


def init_distributed(layout: Layout, seed: int, timeout_minutes: int = 30) -> ProcessGroups:
    """Join (or create) the default process group and build megatron's parallel groups.

    Under torchrun the env:// rendezvous is used; a plain process gets a 1-rank group of its own,
    so single-process tools (load_model, tests) run the same megatron code paths.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from k2mcore import compat

    compat.install()  # megatron's console noise off; the CPU backend when CUDA is absent
    on_cpu = platform.kind() == "cpu"
    if not dist.is_initialized():
        backend = "gloo" if on_cpu else "nccl"
        timeout = timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if not on_cpu:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    if dist.get_world_size() != layout.world_size:
        raise ValueError(f"the layout was resolved for {layout.world_size} ranks, but this job "
                         f"has {dist.get_world_size()}")
    sizes = {**megatron_sizes(layout), "virtual_pipeline_model_parallel_size": layout.vpp}
    if not (ps.model_parallel_is_initialized() and _built_for.get("sizes") == sizes):
        # The same layout again (a tool or test building several models in one process) keeps
        # megatron's groups: torch cannot free a destroyed gloo group while the old model's
        # DDP hooks still reference it, and each leaked group's event loop wakes every 10 ms
        # (dozens per re-initialisation; hundreds slowed a 2-rank parity launch 3x).
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            **sizes,
            distributed_timeout_minutes=timeout_minutes,
            create_gloo_process_groups=not on_cpu,  # on CPU every group is gloo already
        )
        _built_for["sizes"] = sizes
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ProcessGroups(
        layout=layout, rank=dist.get_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_cp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
        cp_rank=ps.get_context_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        cp_group=ps.get_context_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    _built_for.clear()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
