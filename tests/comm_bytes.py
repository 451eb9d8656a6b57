"""Bytes handed to torch.distributed collectives, counted at the API while a block runs (the
tests and, through tests/ on sys.path, the benchmarks).

Every collective's input is counted on the rank that hands it over: a reduce-scatter or an
all-reduce counts its whole input, an all-gather its local shard, an all-to-all what it sends,
a broadcast the source's tensor; a collective over a group of one rank counts nothing. megatron's gradient buffers call the collectives through names
they bound at import (`dist_all_gather_func`, `dist_reduce_scatter_func`); those are wrapped too.
A collective that calls another (an adapter) is counted once, at the outermost call.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


# op name -> (position, keyword) of what this rank hands over, and position of the group
_INPUTS: dict[str, tuple[int, str, int]] = {
    "all_reduce": (0, "tensor", 2),
    "reduce_scatter_tensor": (1, "input", 3),
    "_reduce_scatter_base": (1, "input", 3),
    "reduce_scatter": (1, "input_list", 3),
    "all_gather_into_tensor": (1, "input_tensor", 2),
    "_all_gather_base": (1, "input_tensor", 2),
    "all_gather": (1, "tensor", 2),
    "all_to_all_single": (1, "input", 4),
    "all_to_all": (1, "input_tensor_list", 2),
    "broadcast": (0, "tensor", 2),
}


def _wrap(name: str, fn: Callable, counts: Counter, depth: list) -> Callable:
    pos, key, group_pos = _INPUTS[name]

    def counted(*args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group", args[group_pos] if len(args) > group_pos else None)
        # the outermost call only (a wrapper calling another collective counts once), and only
        # over a group of several ranks (a 1-rank group's bytes never leave the rank)
        if depth[0] == 0 and dist.get_world_size(group) > 1:
            handed = kwargs.get(key, args[pos] if len(args) > pos else None)
            src = kwargs.get("src", args[1] if len(args) > 1 else 0)
            if name == "broadcast" and dist.get_rank() != src:
                handed = None  # only the source hands its tensor over (src is a global rank)
            counts[name] += _nbytes(handed)
        depth[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            depth[0] -= 1

    counted.__wrapped__ = fn  # type: ignore[attr-defined]
    return counted


@contextlib.contextmanager
def count_collective_bytes() -> Iterator[Counter]:
    """Yields a Counter {collective: bytes this rank handed over} filled while the block runs."""
    from megatron.core.distributed import param_and_grad_buffer as pgb

    counts: Counter = Counter()
    depth = [0]
    # (owner, attribute, what it is counted as)
    targets = [(dist, name, name) for name in _INPUTS if hasattr(dist, name)]
    targets += [(pgb, "dist_all_gather_func", "all_gather_into_tensor"),
                (pgb, "dist_reduce_scatter_func", "reduce_scatter_tensor")]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
    try:
        for (owner, attr, as_name), (_, _, fn) in zip(targets, saved):
            setattr(owner, attr, _wrap(as_name, fn, counts, depth))
        yield counts
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def total_over_ranks(counts: Counter) -> int:
    """Sum of every rank's counted bytes (collective; call outside the counted block)."""
    box = torch.tensor([float(sum(counts.values()))], dtype=torch.float64)
    dist.all_reduce(box)
    return int(box.item())
