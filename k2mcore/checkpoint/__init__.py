"""k2mcore checkpoints: the on-disk format, atomic commits, and saving/loading a training run.

    format      directory layout, marker, discovery, size + CRC32 checks (plain python)
    commit      Committer: marker last, rename into place, keep-K pruning (plain python)
    dcp_reader  DCP `.metadata` through an allow-listed unpickler
    rng         RNG states as JSON
    lineage     the release's config and tokenizer files a converted checkpoint carries forward
    writer      torch DCP's file writer, checksumming each file as it is written
    pending     one save's writing, inline or in a background thread (checkpoint.async_save)
    manager     CheckpointManager (save, async save, load, keep-K) and load_weights, over megatron

Importing this package, or `k2mcore.checkpoint.format`, pulls in neither megatron nor
torch.distributed (the converters and `k2m-train --check` rely on it): the names that need them
load on first use.
"""
from __future__ import annotations

from typing import Any

from k2mcore.errors import CheckpointError

from .commit import Committer
from .format import (
    CONFIG,
    DIST,
    FORMAT,
    FORMAT_VERSION,
    MARKER,
    complete_steps,
    crc32,
    has_optimizer_state,
    is_checkpoint,
    latest_checkpoint,
    read_marker,
    resolve_checkpoint,
    saved_step,
    step_dir,
    validate_checkpoint,
    weights_only_marker,
)


def __getattr__(name: str) -> Any:
    """The names that need torch.distributed or megatron, imported on first use."""
    if name in ("CheckpointManager", "load_weights"):
        from . import manager as module
    elif name in ("read_dcp_metadata", "restricted_unpickling"):
        from . import dcp_reader as module
    elif name in ("rng_state", "set_rng_state"):
        from . import rng as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)


__all__ = [
    "CONFIG", "DIST", "FORMAT", "FORMAT_VERSION", "MARKER", "CheckpointError",
    "CheckpointManager", "Committer", "complete_steps", "crc32", "has_optimizer_state",
    "is_checkpoint", "latest_checkpoint", "load_weights", "read_dcp_metadata", "read_marker",
    "resolve_checkpoint", "restricted_unpickling", "rng_state", "saved_step", "set_rng_state",
    "step_dir", "validate_checkpoint", "weights_only_marker",
]
