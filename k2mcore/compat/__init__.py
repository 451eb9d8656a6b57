"""The one home for k2mcore's patches of megatron-core and torch internals.

Each patch is a declared `Patch` (patching.py: target, expected parameters, the megatron-core
release it is for, why, what would remove it), checked before it is applied, so a megatron bump
fails with one line naming the patch. Modules:

- `cpu`: the CPU/gloo backend, active only without CUDA;
- `dist_checkpoint`: the in-process torch_dist writer and the allow-listed DCP reader;
- `mla`: MLA self-attention with TP-replicated down projections and the spec's own q/kv norms;
- `param_sync`: each DistributedOptimizer of a chain all-gathers only its own buffers (one
  parameter all-gather per buffer per step at EP > 1);
- `uneven_shards`: ZeRO-1 shards of unequal size for MuonClip's owner-aligned buffers (the
  buffers' views, the gradient reduce-scatter, the parameter all-gather, the optimizer's ranges);
- `console`: megatron's and torch's known noise, shown once or not at all;
- `preimport`: what megatron reads at import (the console filters; without CUDA, its
  torch.compile'd functions left eager), set before the first megatron import.
"""
from __future__ import annotations

from k2mcore.errors import CompatError

from .patching import MEGATRON_CORE, PATCHES, Patch, applied, check_all

__all__ = ["MEGATRON_CORE", "PATCHES", "CompatError", "Patch", "applied", "check_all", "install",
           "declared_modules"]


def install() -> None:
    """Everything a process needs before megatron runs: the console filters always, the CPU
    backend when CUDA is absent. Idempotent."""
    from k2mcore import platform

    from . import console

    console.install()
    if not platform.has_cuda():
        from . import cpu

        cpu.activate()


def declared_modules() -> list[str]:
    """Import every module that declares patches (so `PATCHES` is complete); their names."""
    import importlib

    names = ["cpu", "dist_checkpoint", "mla", "param_sync", "uneven_shards"]
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names
