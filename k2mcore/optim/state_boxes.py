"""Each data-parallel rank's own share of the distributed optimizer's state, saved as it is held.

megatron's DistributedOptimizer keeps on each DP rank a contiguous slice of every flat gradient
buffer, which covers a flat range [start, end) of some parameters (their 'param' range), and the
fp32 master copy and Adam or Muon moments of exactly that range. This module names that range's
state in the global coordinates of the parameter's model-space tensor, where the model's own
ShardedTensor (or factory: SwiGLU's gate/up split) says this TP/PP/EP shard lies. A flat range
of a row-major tensor is a union of at most 2*ndim-1 boxes, each contiguous in the range, so a
box is a view of the state: nothing is gathered, exchanged or copied to save it. DCP writes the
uneven boxes (megatron hands uneven shards through to it) and, on load, reads into whatever
boxes another TP/PP/EP/DP layout asks for: resharding happens there, and a box that is a view
is loaded in place.

The keys and global shapes are those of megatron's 'fully_reshardable' form
(`optimizer.state.<param|exp_avg|exp_avg_sq>.<model key>`). Why not megatron's own forms: 'fully_reshardable' all-gathers every DP rank's state
onto every DP rank to save it (at K2 scale that does not fit in memory), its
'fully_sharded_model_space' is this idea expressed with ShardedTensor.flattened_range, which
megatron-core 0.19.2's ShardedTensor refuses, and 'dp_reshardable' reshards over DP only.

Muon shards' `exp_avg_sq` (memory-free placeholders, optim/muonclip/sharded.py) are not saved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from torch import Tensor

from k2mcore.optim.muonclip.sharded import is_state_placeholder

FORMAT = "owned_boxes"
_PREFIX = "optimizer.state"
Index = Union[slice, Tensor]  # the elements of a rank's flat state shard that a box holds


@dataclass
class Box:
    """One box of one state tensor: `tensor` (a megatron ShardedTensor) is what DCP writes or
    fills; it holds the elements `index` of the flat state shard `target`."""

    tensor: Any
    target: Tensor
    index: Index


def owned_state(child: Any, model_state: dict, is_loading: bool
                ) -> tuple[dict, dict[tuple[int, str], list[Box]]]:
    """The sharded state of one DistributedOptimizer, {param index: {state key: [box tensor]}},
    and its boxes by (param index, state key), for `put_loaded` after a load."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    model_tensors, _ = extract_sharded_tensors_and_factories(model_state)
    by_param = {id(sh.data): sh for sh in nested_values(model_tensors)}
    instance = getattr(child, "distributed_optimizer_instance_id", 0)
    tree: dict = {}
    boxes: dict[tuple[int, str], list[Box]] = {}
    for i, (param, start, end) in enumerate(_param_ranges(child)):
        sharded = by_param.get(id(param))
        if sharded is None:
            raise ValueError(f"a parameter of shape {tuple(param.shape)} is not in the model's "
                             "sharded state dict")
        if len(sharded.replica_id) != 3:
            raise ValueError(f"{sharded.key}: replica_id {sharded.replica_id} is not (PP, TP, DP)")
        pieces = [(product, offset, shape, index)
                  for product, index_map in _products(sharded, param)
                  for offset, shape, index in _product_boxes(product, index_map, start, end)]
        tree[i] = {}
        for key, state in child._get_main_param_and_optimizer_states(param).items():
            if key == "step" or is_state_placeholder(state) or not pieces:
                continue
            mine = [_make_box(product, key, state, offset, shape, index, instance, is_loading)
                    for product, offset, shape, index in pieces]
            tree[i][key] = [b.tensor for b in mine]
            boxes[(i, key)] = mine
    return tree, boxes


def put_loaded(loaded: dict, boxes: dict[tuple[int, str], list[Box]]) -> None:
    """Copy what dist_checkpointing.load returned for `owned_state`'s tree into the state
    shards (a box that is a view of its shard was already filled in place)."""
    for (i, key), mine in boxes.items():
        for box, value in zip(mine, loaded[i][key], strict=True):
            flat = value.reshape(-1)
            if isinstance(box.index, slice):
                dst = box.target[box.index]
                if dst.data_ptr() != flat.data_ptr():
                    dst.copy_(flat)
            else:
                box.target.index_copy_(0, box.index, flat)


def set_step(child: Any, step: float) -> None:
    """Put the saved Adam step where the inner optimizer reads it: torch's Adam keeps one per
    parameter (each its own tensor: Adam increments it in place), TE's FusedAdam per group."""
    inner = child.optimizer
    for group in inner.param_groups:
        if "step" in group:
            group["step"] = int(step)
        for p in group["params"]:
            state = inner.state.get(p, {})
            if isinstance(state.get("step"), Tensor):
                state["step"] = torch.tensor(float(step), dtype=state["step"].dtype,
                                             device=state["step"].device)


def _param_ranges(child: Any) -> Iterator[tuple[Tensor, int, int]]:
    """(model parameter, start, end) of this DP rank's flat range of every parameter it holds a
    piece of, in megatron's buffer order."""
    for gbuf_range_maps in child.gbuf_ranges:
        for per_bucket in gbuf_range_maps.values():
            for bucket in per_bucket:
                for param, ranges in bucket["param_map"].items():
                    r = ranges["param"]
                    yield param, r.start, r.end


def _products(sharded: Any, param: Tensor) -> Iterator[tuple[Any, Optional[Tensor]]]:
    """The ShardedTensors a model parameter is saved as, each with the flat parameter index of
    every element it holds (row-major), or None where it holds the parameter as it is."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(sharded, ShardedTensor):
        yield sharded, None
        return
    # a factory (SwiGLU's fc1: gate and up as two tensors): build it on the parameter's flat
    # indices, which say where each element it saves comes from
    dtype = torch.int32 if param.numel() < 2 ** 31 else torch.int64
    ids = torch.arange(param.numel(), dtype=dtype).view(param.shape)
    for product in nested_values(sharded.build_fn(sharded.key, ids, sharded.replica_id, None)):
        flat = product.data.reshape(-1)
        if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
            raise ValueError(f"{product.key}: its factory reorders elements; its optimizer state "
                             "cannot be saved as boxes of the parameter's flat shard")
        yield product, flat


def _product_boxes(product: Any, index_map: Optional[Tensor], start: int, end: int
                   ) -> Iterator[tuple[tuple[int, ...], tuple[int, ...], Index]]:
    """(global offset, shape, index into the state shard) of the boxes of `product` that the
    parameter range [start, end) covers."""
    shape = (1,) * product.prepend_axis_num + tuple(product.local_shape)
    if index_map is None:
        lo, hi = start, end
    else:  # the elements of this product inside the range: a run, as the map increases
        lo = int(torch.searchsorted(index_map, start))
        hi = int(torch.searchsorted(index_map, end))
    for offset, box, first in flat_range_boxes(shape, lo, hi):
        n = math.prod(box)
        if index_map is None:
            index: Index = slice(first - start, first - start + n)
        else:
            ids = index_map[first:first + n].to(torch.int64) - start
            contiguous = int(ids[-1]) - int(ids[0]) == n - 1
            index = slice(int(ids[0]), int(ids[0]) + n) if contiguous else ids
        yield tuple(g + o for g, o in zip(product.global_offset, offset)), box, index


def flat_range_boxes(shape: tuple[int, ...], lo: int, hi: int
                     ) -> Iterator[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Split the row-major flat range [lo, hi) of a tensor of `shape` into boxes, each one a
    contiguous run of the range: (offset, box shape, flat index of its first element)."""
    if lo >= hi:
        return
    if len(shape) == 1:
        yield (lo,), (hi - lo,), lo
        return
    inner = math.prod(shape[1:])
    r0, c0 = divmod(lo, inner)
    r1, c1 = divmod(hi, inner)
    if r0 == r1:  # within one row
        for off, box, first in flat_range_boxes(shape[1:], c0, c1):
            yield (r0, *off), (1, *box), r0 * inner + first
        return
    if c0:  # the end of the first, partial row
        for off, box, first in flat_range_boxes(shape[1:], c0, inner):
            yield (r0, *off), (1, *box), r0 * inner + first
        r0 += 1
    if r1 > r0:  # whole rows
        yield (r0, *([0] * (len(shape) - 1))), (r1 - r0, *shape[1:]), r0 * inner
    if c1:  # the start of the last, partial row
        for off, box, first in flat_range_boxes(shape[1:], 0, c1):
            yield (r1, *off), (1, *box), r1 * inner + first


def _make_box(product: Any, key: str, state: Tensor, offset: tuple[int, ...],
              shape: tuple[int, ...], index: Index, instance: int, is_loading: bool) -> Box:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(index, slice):
        data = state.view(-1)[index].view(shape)  # saved from, or loaded into, the shard itself
    elif is_loading:
        data = torch.empty(shape, dtype=state.dtype, device=state.device)
    else:
        data = state.view(-1)[index].view(shape)
    tensor = ShardedTensor(
        key=f"{_PREFIX}.{key}.{product.key}", data=data, dtype=data.dtype, local_shape=shape,
        global_shape=tuple(product.global_shape), global_offset=offset, axis_fragmentations=None,
        # each DP rank holds its own range: the DP coordinate is that of the optimizer instance
        replica_id=(*product.replica_id[:2], instance), prepend_axis_num=0)
    return Box(tensor, state.view(-1), index)
