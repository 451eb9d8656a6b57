"""Bytes autograd saves for backward, counted while a block runs (the activation planner's
measurement: k2mcore/plan/activations.py, tests/parity/activation_probe.py).

Every tensor autograd saves passes `torch.autograd.graph.saved_tensors_hooks`' pack hook; this
counts the UNIQUE storages behind them (deduplicated by storage, each counted
once with its whole nbytes while any saved tensor referencing it is alive), leaves out the
storages of the parameters and buffers handed in (megatron's LinearWithGradAccumulation saves
the weight; DDP's parameters live in its param buffer), and tracks the peak of the live total
over the block. A saved tensor is released when autograd frees the graph node holding it
(after that node's backward, or when the graph is dropped): the pack hook returns a small
holder object whose `weakref.finalize` decrements the storage's reference count.

Activation checkpointing (megatron's tensor_parallel.checkpoint, CheckpointWithoutOutput)
re-runs the forward inside backward with grad enabled: the recomputed graph's saved tensors
pass the same hooks and count while they live, which is the recompute's transient.

Tensors a custom autograd function keeps as plain `ctx` attributes do not pass the hooks and are
not counted; neither are the schedule's own references (megatron's input/output tensor lists).
"""
from __future__ import annotations

import contextlib
import sys
import traceback
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch


def storage_keys(tensors: Iterable[torch.Tensor]) -> set[int]:
    """Keys (StorageImpl addresses) of the storages behind `tensors` (parameters, their
    main_grad, DDP buffers)."""
    return {t.untyped_storage()._cdata for t in tensors if isinstance(t, torch.Tensor)}


def model_storages(model) -> set[int]:
    """Storages of every parameter, buffer, main_grad and DDP param/grad buffer of `model`
    (a module or a list of DDP-wrapped chunks)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    tensors: list = []
    for chunk in chunks:
        for p in chunk.parameters():
            tensors.append(p)
            if getattr(p, "main_grad", None) is not None:
                tensors.append(p.main_grad)
            if p.grad is not None:
                tensors.append(p.grad)
        module = getattr(chunk, "module", chunk)
        tensors.extend(module.buffers())
        for buffers in ("buffers", "expert_parallel_buffers"):
            for b in getattr(chunk, buffers, None) or []:
                tensors += [getattr(b, "param_data", None), getattr(b, "grad_data", None)]
    return storage_keys(t for t in tensors if t is not None)


class _Held:
    """What the pack hook returns: the saved tensor (detached: no reference back to its node)."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


@dataclass
class SavedBytes:
    """Filled while `count_saved_bytes` runs."""

    peak: int = 0  # most bytes alive at once over the block
    live: int = 0  # bytes alive now
    packed: int = 0  # saved tensors seen
    # live bytes each time a backward starts after forwards ran: with one micro-batch at a time
    # (no pipelining), each is one micro-batch's saved state
    per_micro_batch: list[int] = field(default_factory=list)
    by_site: dict = field(default_factory=lambda: defaultdict(int))  # attribution (debug)
    refs: dict = field(default_factory=dict)  # storage key -> [count, nbytes when saved]
    # (attribute) live bytes by site when the first backward starts
    first_state: dict = field(default_factory=lambda: defaultdict(int))

    def micro_batch_bytes(self) -> Optional[int]:
        """The one-micro-batch figure when one micro-batch runs at a time (no pipelining): the
        largest live total at the start of a backward (the forward's saved state)."""
        return max(self.per_micro_batch) if self.per_micro_batch else None


def _site() -> str:
    """The innermost k2mcore/megatron frame saving the tensor (debug attribution)."""
    for frame in reversed(traceback.extract_stack(limit=40)[:-3]):
        f = frame.filename
        if "k2mcore/compat" in f:
            continue
        if "megatron/core" in f or "k2mcore" in f:
            short = f.split("megatron/core/")[-1].split("k2mcore/")[-1]
            return f"{short}:{frame.lineno}:{frame.name}"
    return "?"


@contextlib.contextmanager
def count_saved_bytes(exclude: Iterable[int] = (), *, attribute: bool = False
                      ) -> Iterator[SavedBytes]:
    """Yields a SavedBytes whose `peak` is the most bytes of unique, non-parameter storages
    saved for backward and alive at once while the block runs. `exclude`: storage keys not to
    count (`model_storages(model)`). `attribute`: also sum first-seen bytes by the code site
    that saved them (slow; for working out a model).

    Storages are keyed by their StorageImpl (`untyped_storage()._cdata`), which is what a
    data_ptr identifies while the storage holds data, and stays the same when megatron's
    CheckpointWithoutOutput resizes an output's storage to 0 in forward (its
    `discard_output_and_register_recompute`) and back in backward: the live total reads each
    storage's current nbytes, so a discarded output counts 0 until it is recomputed."""
    stats = SavedBytes()
    skip = set(exclude)
    storages: dict = {}  # key -> UntypedStorage (current nbytes)
    phase = ["pack"]
    sites: dict = {}  # key -> where it was first saved (attribute)

    def current() -> int:
        return sum(st.nbytes() for st in storages.values())

    def sample() -> None:
        stats.live = current()
        if stats.live > stats.peak:
            stats.peak = stats.live

    def release(key: int) -> None:
        ref = stats.refs[key]
        ref[0] -= 1
        if ref[0] == 0:
            del stats.refs[key]
            del storages[key]

    def pack(t: torch.Tensor):
        if not isinstance(t, torch.Tensor):
            return t
        storage = t.untyped_storage()
        key = storage._cdata
        if key in skip:
            return t
        if phase[0] == "unpack":  # a backward ran since the last pack: forward state
            phase[0] = "pack"
        stats.packed += 1
        ref = stats.refs.get(key)
        if ref is None:
            ref = stats.refs[key] = [0, storage.nbytes()]
            storages[key] = storage
            if attribute:
                where = (_site(), tuple(t.shape), str(t.dtype))
                stats.by_site[where] += ref[1]
                sites[key] = where
        ref[0] += 1
        sample()
        held = _Held(t.detach())
        weakref.finalize(held, release, key)
        return held

    def unpack(held):
        if phase[0] == "pack":
            phase[0] = "unpack"
            stats.live = current()
            stats.per_micro_batch.append(stats.live)  # live bytes when a backward starts
            if attribute and not stats.first_state:
                for key, st in storages.items():
                    stats.first_state[sites.get(key)] += st.nbytes()
        sample()
        return held.t if isinstance(held, _Held) else held

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield stats
    stats.live = current()


def print_sites(stats: SavedBytes, file=sys.stdout) -> None:
    print("-- alive when the first backward starts, by site:", file=file)
    for where, n in sorted(stats.first_state.items(), key=lambda kv: str(kv[0])):
        print(f"{n:>10} {where}", file=file)
    print("-- first-seen bytes by site, whole block:", file=file)
    for (site, shape, dtype), n in sorted(stats.by_site.items(), key=lambda kv: kv[0][0]):
        print(f"{n:>10} {site} {shape} {dtype}", file=file)
