"""ZeRO-1 shards of unequal size, for MuonClip's owner-aligned buffers
(k2mcore/optim/muonclip/shard_plan.py).

megatron-core 0.19.2 cuts every DDP bucket into equal per-rank ranges, in four places: the views
`shard_buffer` hands its collectives, the collectives themselves (`reduce_scatter_tensor` and
`all_gather_into_tensor` need equal sizes), the DistributedOptimizer's `_build_model_gbuf_range`
(which range each rank optimizes), and `get_parameter_state_dp_zero` (the state gather behind its
'fully_reshardable' checkpoints). For a bucket registered here all four follow the bucket's
planned bounds: list-form `reduce_scatter` and `all_gather` (NCCL runs uneven sizes as grouped
send/recv; gloo's reduce_scatter takes them, its all_gather through the CPU backend's adapter).
Buckets nobody registered keep megatron's behaviour exactly.

Why not megatron's own uneven path: its layer-wise optimizer all-gathers variable sizes, but
reduces gradients with a full all-reduce (twice the reduce-scatter's bytes) and pads each bucket
to equal ranges for its distributed-optimizer mode (benchmarks/bench_muon_shards.py).
"""
from __future__ import annotations

import weakref
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .patching import Patch, apply, companion, declare

_PGB = "megatron.core.distributed.param_and_grad_buffer"
_DISTRIB = "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer"

SHARD_BUFFER = declare(Patch(
    "uneven-shard-buffer", f"{_PGB}.shard_buffer", params=("buffer", "data_parallel_world_size"),
    why="DDP cuts each bucket into equal shards; MuonClip's owner-aligned buckets are cut where "
        "the shard planner put the owners' boundaries",
    remove_when="megatron's param layout carries per-rank shard bounds"))
REDUCE_SCATTER = companion(
    SHARD_BUFFER, "uneven-reduce-scatter", f"{_PGB}.dist_reduce_scatter_func",
    "the gradient reduce-scatter over uneven shards (list form)",
    params=("output", "input", "op", "group", "async_op"))
ALL_GATHER = companion(
    SHARD_BUFFER, "uneven-all-gather", f"{_PGB}.dist_all_gather_func",
    "the parameter all-gather over uneven shards (list form)",
    params=("output_tensor", "input_tensor", "group", "async_op"))
GBUF_RANGE = companion(
    SHARD_BUFFER, "uneven-optimizer-range", f"{_DISTRIB}._build_model_gbuf_range",
    "the range of each bucket a rank's optimizer steps",
    params=("cls", "param_and_grad_buffer", "bucket_index"))
STATE_GATHER = companion(
    SHARD_BUFFER, "uneven-state-gather", f"{_DISTRIB}.get_parameter_state_dp_zero",
    "the 'fully_reshardable' checkpoint gathers each rank's shard of every bucket",
    params=("self", "use_gloo_comm", "empty_data", "return_on_all_ranks"))

# id() of a registered bucket's grad_data / param_data view -> per-rank (start, end); an entry
# goes when its view does (weakref.finalize), so a later buffer can never inherit it
_BOUNDS: dict[int, list[tuple[int, int]]] = {}


def register(bucket: Any, bounds: Sequence[tuple[int, int]]) -> None:
    """Shard `bucket` (a megatron _ParamAndGradBucket) at `bounds` [rank] -> (start, end), relative
    to the bucket; they must cover it contiguously. Call before the optimizer is built."""
    install()
    bounds = [(int(s), int(e)) for s, e in bounds]
    numel = bucket.grad_data.numel()
    ends = [0] + [e for _, e in bounds]
    if [s for s, _ in bounds] != ends[:-1] or ends[-1] != numel:
        raise ValueError(f"uneven shards {bounds} do not cover the bucket's {numel} elements")
    for t in (bucket.grad_data, getattr(bucket, "param_data", None)):
        if t is not None and id(t) not in _BOUNDS:
            _BOUNDS[id(t)] = bounds
            weakref.finalize(t, _BOUNDS.pop, id(t), None)


def bounds_of(t: Optional[torch.Tensor]) -> Optional[list[tuple[int, int]]]:
    return _BOUNDS.get(id(t)) if t is not None else None


def _views(t: torch.Tensor, bounds: list[tuple[int, int]]) -> list[torch.Tensor]:
    return [t[s:e] for s, e in bounds]


def install() -> None:
    """Apply the patches (idempotent); inert for buckets nobody registered."""
    from megatron.core.optimizer.distrib_optimizer import Range

    def shard_buffer(orig):
        def patched(buffer, data_parallel_world_size):
            bounds = bounds_of(buffer)
            return orig(buffer, data_parallel_world_size) if bounds is None else _views(buffer, bounds)
        return patched

    def reduce_scatter(orig):
        def patched(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
            bounds = bounds_of(input)
            if bounds is None:
                return orig(output, input, op=op, group=group, async_op=async_op)
            return dist.reduce_scatter(output, _views(input, bounds), op=op, group=group,
                                       async_op=async_op)
        return patched

    def all_gather(orig):
        def patched(output_tensor, input_tensor, group=None, async_op=False):
            bounds = bounds_of(output_tensor)
            if bounds is None:
                return orig(output_tensor, input_tensor, group=group, async_op=async_op)
            return dist.all_gather(_views(output_tensor, bounds), input_tensor, group=group,
                                   async_op=async_op)
        return patched

    def gbuf_range(orig):
        def patched(cls, param_and_grad_buffer, bucket_index):
            bucket = param_and_grad_buffer.buckets[bucket_index]
            bounds = bounds_of(bucket.grad_data)
            if bounds is None:
                return orig.__func__(cls, param_and_grad_buffer, bucket_index)
            s, e = bounds[param_and_grad_buffer.data_parallel_group.rank()]
            world = Range(s + bucket.offset, e + bucket.offset)
            return {"param_map": cls._build_model_gbuf_param_range_map(
                param_and_grad_buffer.param_index_map, world, bucket.offset)}
        return classmethod(patched)

    def state_gather(orig):
        def patched(self, use_gloo_comm=True, empty_data=False, return_on_all_ranks=False):
            if not any(bounds_of(b.grad_data) for buf in self.buffers for b in buf.buckets):
                return orig(self, use_gloo_comm, empty_data, return_on_all_ranks)
            return _state_dp_zero(self, empty_data, return_on_all_ranks)
        return patched

    for patch in (SHARD_BUFFER, REDUCE_SCATTER, ALL_GATHER, GBUF_RANGE, STATE_GATHER):
        patch.check()
    apply(SHARD_BUFFER, shard_buffer)
    apply(REDUCE_SCATTER, reduce_scatter)
    apply(ALL_GATHER, all_gather)
    apply(GBUF_RANGE, gbuf_range)
    apply(STATE_GATHER, state_gather)


def _state_dp_zero(opt: Any, empty_data: bool, return_on_all_ranks: bool) -> Optional[dict]:
    """megatron's get_parameter_state_dp_zero for buffers with registered (uneven) buckets: the
    same result (per buffer and dtype: world tensors of the unpadded buffer for the fp32 param
    and every optimizer state key), each rank's shard all-gathered at its own size."""
    group = opt.data_parallel_group
    size, rank = group.size(), group.rank()
    keys = ("param",) + tuple(opt.optimizer_state_keys)
    state: dict = {"buckets_coalesced": True}
    for gbuf_idx, gbuf_range_maps in enumerate(opt.gbuf_ranges):
        assert len(gbuf_range_maps) == 1, "single dtype supported, for now."
        buffer = opt.buffers[gbuf_idx]
        dtype_state = {}
        for dtype, per_bucket in gbuf_range_maps.items():
            world = {k: torch.zeros((buffer.numel_unpadded,), dtype=torch.float32) for k in keys}
            world["numel_unpadded"] = buffer.numel_unpadded
            offset = 0
            for bucket_idx, gbuf_range_map in enumerate(per_bucket):
                bucket = buffer.buckets[bucket_idx]
                numel = bucket.grad_data.numel()
                bounds = bounds_of(bucket.grad_data) or [
                    (r * numel // size, (r + 1) * numel // size) for r in range(size)]
                if not empty_data:
                    start, end = bounds[rank]
                    local = {k: torch.zeros((end - start,), dtype=torch.float32) for k in keys}
                    for model_param, ranges in gbuf_range_map["param_map"].items():
                        tensors = opt._get_main_param_and_optimizer_states(model_param)
                        lo, hi = ranges["gbuf_local"].start, ranges["gbuf_local"].end
                        for k in keys:
                            local[k][lo:hi].copy_(tensors[k].detach().cpu())
                    unpadded = bucket.numel_unpadded
                    device = bucket.grad_data.device
                    for k in keys:
                        parts = [torch.zeros((e - s,), dtype=torch.float32, device=device)
                                 for s, e in bounds]
                        dist.all_gather(parts, local[k].to(device), group=group)
                        world[k][offset:offset + unpadded].copy_(torch.cat(parts).cpu()[:unpadded])
                offset += bucket.numel_unpadded
            dtype_state[dtype] = world
        state[gbuf_idx] = dtype_state
    return state if rank == 0 or return_on_all_ranks else None
