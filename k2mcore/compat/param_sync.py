"""One parameter all-gather per DDP buffer per step, with EP > 1 too.

With expert parallelism megatron-core 0.19.2's ChainedOptimizer holds two DistributedOptimizers
over the same model chunks, one for the dense buffers and one for the expert buffers. After its
step each calls `start_param_sync_for_bucket_group_subset`, which walks every bucket group of
every chunk, so every buffer is all-gathered twice: 1.5x ZeRO-1's data-parallel bytes on every K2
layout. Here each DistributedOptimizer syncs only the bucket groups of its own buffers (still
skipping those a layer-wise optimizer manages, as megatron does); together the children gather
each buffer once. With one DistributedOptimizer (EP = 1) nothing changes.
"""
from __future__ import annotations

from .patching import Patch, apply, companion, declare

_DISTRIB = "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer"

PARAM_SYNC = declare(Patch(
    "param-sync-own-buffers", f"{_DISTRIB}.start_param_sync_for_bucket_group_subset",
    params=("self",),
    why="with EP > 1 the dense and the expert DistributedOptimizer each all-gather every bucket "
        "group of every chunk, so each parameter buffer is gathered twice per step",
    remove_when="megatron's DistributedOptimizer syncs only the bucket groups of its own buffers"))
LAYER_WISE_TAG = companion(
    PARAM_SYNC, "param-sync-layer-wise-tag",
    "megatron.core.optimizer.layer_wise_optimizer._bucket_is_managed_by_layer_wise_optimizer",
    "the replacement skips the bucket groups a layer-wise optimizer manages, as megatron's does "
    "(checked, not replaced)", params=("bucket", "default_for_untagged"))


def install() -> None:
    """Idempotent; call before the optimizer's first step."""
    LAYER_WISE_TAG.check()

    def start_param_sync(orig):
        def patched(self) -> None:
            from megatron.core.optimizer.layer_wise_optimizer import (
                _bucket_is_managed_by_layer_wise_optimizer as layer_wise,
            )

            own = {id(bucket) for buffer in self.buffers for bucket in buffer.buckets}
            for chunk in self.model_chunks:
                for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
                    if not group.buckets or id(group.buckets[0]) not in own:
                        continue
                    if layer_wise(group.buckets[0], default_for_untagged=False):
                        continue
                    chunk._start_bucket_group_param_sync(group, force_sync=False)
        return patched

    apply(PARAM_SYNC, start_param_sync)
