"""In-memory resharding of model tensors between any layout and full (1-rank) shape.

Uses the sharding metadata megatron-core attaches to every tensor (`sharded_state_dict()`:
key, global shape and offset, replica id, SwiGLU factories), so it follows megatron's own idea of
who holds what under TP/SP/PP/VPP/EP/ETP/DP. Meant for small models: tests and dry runs that
must compare a layout with a 1-rank run (everything passes through rank 0). Checkpoints of real
size go through dist-checkpointing instead.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedTensor,
    ShardedTensorFactory,
    apply_factories,
    is_main_replica,
)

Full = dict[str, torch.Tensor]  # sharded key -> tensor of the key's global shape


def _param_shards(
    chunks: Sequence[torch.nn.Module], swap: Optional[Callable[[torch.nn.Parameter], torch.Tensor]]
) -> list[ShardedTensor]:
    """The ShardedTensors of every parameter of this rank (buffers and objects dropped).

    With `swap`, each shard's data is `swap(param)` (e.g. its main_grad) instead of the weight.
    """
    shards: list[ShardedTensor] = []
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)  # unwrap megatron DDP
        params = {id(p): p for p in module.parameters()}
        sharded = module.sharded_state_dict()
        kept = {}
        for i, item in enumerate(nested_values(sharded)):
            if not isinstance(item, (ShardedTensor, ShardedTensorFactory)):
                continue
            param = params.get(id(item.data))
            if param is None:
                continue  # a buffer (e.g. the router's expert bias statistics)
            if swap is not None:
                item.data = swap(param)
            kept[str(i)] = item
        apply_factories(kept)
        shards.extend(v for v in nested_values(kept) if isinstance(v, ShardedTensor))
    return shards


def _index(sh: ShardedTensor) -> tuple:
    pre = sh.prepend_axis_num
    idx = list(sh.global_offset[:pre])
    for off, size in zip(sh.global_offset[pre:], sh.local_shape):
        idx.append(slice(off, off + size))
    return tuple(idx)


def gather_full(
    chunks: Sequence[torch.nn.Module],
    swap: Optional[Callable[[torch.nn.Parameter], torch.Tensor]] = None,
) -> Optional[Full]:
    """Full-shape tensors of all parameters (or of `swap(param)`), on rank 0; None elsewhere."""
    local = [
        (sh.key, sh.global_shape, _index(sh), sh.data.detach().float().cpu().clone())
        for sh in _param_shards(chunks, swap)
        if is_main_replica(sh.replica_id)
    ]
    pieces: list = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, local)
    if dist.get_rank() != 0:
        return None
    full: Full = {}
    for rank_pieces in pieces:
        for key, shape, idx, data in rank_pieces:
            if key not in full:
                full[key] = torch.full(shape, float("nan"))
            full[key][idx] = data
    return full


def scatter_full(chunks: Sequence[torch.nn.Module], full: Full) -> None:
    """Copy each of this rank's parameter shards out of full-shape tensors."""
    with torch.no_grad():
        for sh in _param_shards(chunks, swap=None):
            if sh.key not in full:
                raise KeyError(f"no tensor {sh.key} in the full state")
            sh.data.copy_(full[sh.key][_index(sh)].to(sh.data.dtype))
