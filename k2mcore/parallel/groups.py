"""Process groups from the config: torch.distributed, then megatron's parallel_state."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from k2mcore import platform
from k2mcore.config.schema import ParallelConfig


def virtual_stages(parallel: ParallelConfig) -> Optional[int]:
    """VPP size: explicit, or implied by a layout string (stages / pp)."""
    if parallel.pipeline_layout:
        from megatron.core.transformer.pipeline_parallel_layer_layout import (
            PipelineParallelLayerLayout,
        )

        stages = PipelineParallelLayerLayout.parse_str_to_list(parallel.pipeline_layout)
        vpp = len(stages) // parallel.pp
        return vpp if vpp > 1 else None
    return parallel.vpp


def init_distributed(parallel: ParallelConfig, seed: int, timeout_minutes: int = 30) -> None:
    """Join (or create) the default process group and build megatron's parallel groups.

    Under torchrun the env:// rendezvous is used; a plain process gets a 1-rank group of its own,
    so single-process tools (load_model, tests) run the same megatron code paths.
    """
    from megatron.core import parallel_state, tensor_parallel

    from k2mcore import compat

    parallel.resolve()
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
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=virtual_stages(parallel),
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=not on_cpu,  # on CPU every group is gloo already
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
