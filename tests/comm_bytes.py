"""Bytes handed to torch.distributed collectives, counted at the API while a block runs (the
tests and, through tests/ on sys.path, the benchmarks).

Every collective's input is counted on the rank that hands it over: a reduce-scatter or an
all-reduce counts its whole input, an all-gather its local shard, an all-to-all what it sends,
a broadcast the source's tensor. megatron's gradient buffers call the collectives through names
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


# op name -> which argument holds what this rank hands over (position, keyword)
_INPUTS: dict[str, tuple[int, str]] = {
    "all_reduce": (0, "tensor"),
    "reduce_scatter_tensor": (1, "input"),
    "_reduce_scatter_base": (1, "input"),
    "reduce_scatter": (1, "input_list"),
    "all_gather_into_tensor": (1, "input_tensor"),
    "_all_gather_base": (1, "input_tensor"),
    "all_gather": (1, "tensor"),
    "all_to_all_single": (1, "input"),
    "all_to_all": (1, "input_tensor_list"),
    "broadcast": (0, "tensor"),
}


def _wrap(name: str, fn: Callable, counts: Counter, depth: list) -> Callable:
    pos, key = _INPUTS[name]

    def counted(*args: Any, **kwargs: Any) -> Any:
        if depth[0] == 0:  # the outermost call: a wrapper calling another collective counts once
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
