"""k2mcore checkpoints: the on-disk format (k2mcore.checkpoint.format, plain python)."""
from __future__ import annotations

from .format import (
    CONFIG,
    DIST,
    FORMAT,
    FORMAT_VERSION,
    MARKER,
    CheckpointError,
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

__all__ = [
    "CONFIG", "DIST", "FORMAT", "FORMAT_VERSION", "MARKER", "CheckpointError", "complete_steps",
    "crc32", "has_optimizer_state", "is_checkpoint", "latest_checkpoint", "read_marker",
    "resolve_checkpoint", "saved_step", "step_dir", "validate_checkpoint",
    "weights_only_marker",
]
