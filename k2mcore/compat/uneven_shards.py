"""ZeRO-1 shards of unequal size, for MuonClip's owner-aligned buffers
(k2mcore/optim/muonclip/shard_plan.py).

megatron-core 0.19.2 cuts every DDP bucket into equal per-rank ranges where the training step
uses them: the views `shard_buffer` hands its collectives, the collectives themselves
(`reduce_scatter_tensor` and `all_gather_into_tensor` need equal sizes) and the
DistributedOptimizer's `_build_model_gbuf_range` (which range each rank optimizes). For a bucket
registered here all three follow the bucket's planned bounds: list-form `reduce_scatter` and
`all_gather` (NCCL runs uneven sizes as grouped send/recv; gloo's reduce_scatter takes them, its
all_gather through the CPU backend's adapter). Buckets nobody registered keep megatron's
behaviour exactly.

Under overlapped communication (train.overlap_grad_reduce / overlap_param_gather) megatron issues
a bucket group's collectives inside torch's `_coalescing_manager` and keeps its handle; torch
coalesces only the tensor forms, so the list forms' Work objects would be dropped and the wait
would wait on nothing. The uneven collectives therefore hand their Work to the coalescing manager
they run under (`uneven-coalescing-handle`), so megatron's one handle covers every piece.

Checkpoints need no patch: k2mcore saves each rank's optimizer state as boxes of the model-space
tensors (k2mcore.optim.state_boxes), whatever the shard bounds. megatron's own gathered forms
('fully_reshardable', `get_parameter_state_dp_zero`) assume equal shards, and k2mcore never calls
them on owner-aligned buffers.

Why not megatron's own uneven path: its layer-wise optimizer all-gathers variable sizes, but
reduces gradients with a full all-reduce (twice the reduce-scatter's bytes) and pads each bucket
to equal ranges for its distributed-optimizer mode (benchmarks/bench_muon_shards.py).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Optional, Sequence

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
COALESCING = companion(
    SHARD_BUFFER, "uneven-coalescing-handle", f"{_PGB}._coalescing_manager",
    "records the coalescing manager a bucket group's collectives run under, so the uneven "
    "list-form collectives' Work joins the handle megatron keeps (torch coalesces only the "
    "tensor forms)", params=("group", "device", "async_ops"))
GBUF_RANGE = companion(
    SHARD_BUFFER, "uneven-optimizer-range", f"{_DISTRIB}._build_model_gbuf_range",
    "the range of each bucket a rank's optimizer steps",
    params=("cls", "param_and_grad_buffer", "bucket_index"))
_MANAGERS: list = []  # the coalescing managers entered and not yet left, innermost last
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


def _handed(work: Any, async_op: bool) -> Any:
    """An async uneven collective's Work: into the coalescing manager it runs under, whose
    handle megatron waits on (and None back, as a coalesced call returns), else to the caller."""
    if async_op and _MANAGERS and work is not None:
        _MANAGERS[-1].append(work)
        return None
    return work


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
            return _handed(dist.reduce_scatter(output, _views(input, bounds), op=op, group=group,
                                               async_op=async_op), async_op)
        return patched

    def all_gather(orig):
        def patched(output_tensor, input_tensor, group=None, async_op=False):
            bounds = bounds_of(output_tensor)
            if bounds is None:
                return orig(output_tensor, input_tensor, group=group, async_op=async_op)
            return _handed(dist.all_gather(_views(output_tensor, bounds), input_tensor,
                                           group=group, async_op=async_op), async_op)
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

    def coalescing(orig):
        @contextlib.contextmanager
        def patched(group=None, device=None, async_ops=False) -> Iterator[Any]:
            with orig(group, device, async_ops) as cm:
                _MANAGERS.append(cm)
                try:
                    yield cm
                finally:
                    _MANAGERS.pop()
        return patched

    for patch in (SHARD_BUFFER, REDUCE_SCATTER, ALL_GATHER, COALESCING, GBUF_RANGE):
        patch.check()
    apply(SHARD_BUFFER, shard_buffer)
    apply(COALESCING, coalescing)
    apply(REDUCE_SCATTER, reduce_scatter)
    apply(ALL_GATHER, all_gather)
    apply(GBUF_RANGE, gbuf_range)
