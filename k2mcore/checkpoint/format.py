"""The on-disk format of a k2mcore checkpoint and its integrity checks.

One checkpoint is a directory:

    <root>/step_00000042/
        metadata.json          completion marker, written last: step, consumed samples, layout,
                               scheduler, Adam step, size + CRC32 of every other file
        config.yaml            the resolved config
        dist/                  torch_dist checkpoint of model and optimizer (reshardable: keys are
                               global tensor names, shards carry their global offsets)
        rng/rank_00000.json    each rank's RNG states (restored only at the same layout)

A save writes `<root>/.tmp_step_00000042` and renames it into place (k2mcore.checkpoint.commit),
so only a directory with a readable marker counts as a checkpoint.

Plain python on purpose (no megatron, no torch.distributed): the trainer, the converters and
`load_model` all read and write this format, and the converters must not pay megatron's import.
"""
from __future__ import annotations

import json
import os
import re
import sys
import zlib
from typing import Any, Optional

from k2mcore.errors import CheckpointError

FORMAT, FORMAT_VERSION = "k2mcore-checkpoint", 1

# The directory layout, named here only.
MARKER = "metadata.json"
CONFIG = "config.yaml"
DIST = "dist"
RNG = "rng"
TMP_PREFIX = ".tmp_step_"
TRASH_PREFIX = ".trash_"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_CRC_CHUNK = 1 << 22
_REQUIRED = ("step", "consumed_samples", "layout", "optimizer", "files")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def tmp_step_dir(root: str, step: int) -> str:
    """Where a save of `step` is written before it is committed."""
    return os.path.join(root, f"{TMP_PREFIX}{step:08d}")


def rng_file(rank: int) -> str:
    """A rank's RNG state file, relative to the checkpoint directory."""
    return os.path.join(RNG, f"rank_{rank:05d}.json")


# --------------------------------------------------------------------------------------------
# Finding checkpoints
def complete_steps(root: str) -> list[tuple[int, str]]:
    """(step, path) of every directory under root that has a readable marker, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, MARKER)):
            try:
                with open(os.path.join(path, MARKER)) as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue  # unreadable marker: not complete
            if isinstance(meta, dict) and meta.get("format") == FORMAT:
                found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint under root (`.tmp_*` and unmarked dirs ignored), or None."""
    done = complete_steps(root)
    return done[-1][1] if done else None


def is_checkpoint(path: str) -> bool:
    """A k2mcore checkpoint step directory, or a root holding at least one complete one."""
    marker = os.path.join(path, MARKER)
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                return json.load(f).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    return os.path.isdir(path) and latest_checkpoint(path) is not None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a root holding `step_*` ones (-> its newest complete one)."""
    name = os.path.basename(os.path.normpath(path))
    if (_STEP_DIR.match(name) or name.startswith(TMP_PREFIX)
            or os.path.exists(os.path.join(path, MARKER))
            or os.path.isdir(os.path.join(path, DIST))):
        return path  # a checkpoint directory, complete or not: validation says which
    newest = latest_checkpoint(path)
    if newest is None:
        what = "does not exist" if not os.path.exists(path) else "holds no complete checkpoint"
        raise CheckpointError(f"{path}: {what} (expected a step_NNNNNNNN directory or its root)")
    return newest


def saved_step(path: str) -> int:
    """The training step a checkpoint (or a root's newest one) was saved at."""
    return int(read_marker(resolve_checkpoint(path))["step"])


def has_optimizer_state(path: str) -> bool:
    """False for a weights-only checkpoint (written by k2m-convert hf-to-mcore)."""
    return bool(read_marker(resolve_checkpoint(path)).get("optimizer"))


# --------------------------------------------------------------------------------------------
# The marker and the file manifest
def read_marker(path: str) -> dict:
    """A checkpoint directory's metadata.json, checked for format, version and required keys."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        raise CheckpointError(
            f"{path}: incomplete checkpoint (no {MARKER}) — it was not finished")
    try:
        with open(marker) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{marker}: corrupt checkpoint metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{marker}: not a {FORMAT} metadata file")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{marker}: format version {meta.get('version')}, "
                              f"this k2mcore reads {FORMAT_VERSION}")
    for key in _REQUIRED:
        if key not in meta:
            raise CheckpointError(f"{marker}: corrupt checkpoint metadata (no {key!r})")
    return meta


def check_files(path: str, meta: dict, share: tuple[int, int] = (0, 1),
                checksums: bool = True) -> list[str]:
    """Problems with the files the marker lists: every file's size, and the CRC32 of share
    (index, count) of them, so that ranks can split the reading."""
    errors = []
    for i, (rel, want) in enumerate(sorted(meta["files"].items())):
        full = os.path.join(path, rel)
        if os.path.isabs(rel) or ".." in rel.split(os.sep) or not isinstance(want, dict):
            errors.append(f"{os.path.join(path, MARKER)}: corrupt checkpoint metadata "
                          f"(file entry {rel!r})")
        elif not os.path.isfile(full):
            errors.append(f"{full}: missing from the checkpoint")
        elif os.path.getsize(full) != want["size"]:
            errors.append(f"{full}: corrupt ({os.path.getsize(full)} bytes, the checkpoint "
                          f"recorded {want['size']}; truncated or overwritten)")
        elif checksums and i % share[1] == share[0] and crc32(full) != want["crc32"]:
            errors.append(f"{full}: corrupt (CRC32 differs from the one recorded at save)")
    return errors


def validate_checkpoint(path: str, *, checksums: bool = True) -> dict:
    """Check one checkpoint directory on this process alone; returns its metadata.

    Raises CheckpointError naming the directory or the first bad file.
    """
    meta = read_marker(path)
    errors = check_files(path, meta, checksums=checksums)
    if errors:
        raise CheckpointError(errors[0])
    return meta


def crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_entry(path: str) -> dict[str, int]:
    """The manifest entry of one file: {"size", "crc32"}."""
    return {"size": os.path.getsize(path), "crc32": crc32(path)}


def weights_only_marker(*, model: str, files: dict, extra: Optional[dict] = None) -> dict:
    """The marker of a checkpoint that holds weights only (k2m-convert hf-to-mcore): step 0, no
    optimizer or scheduler state, no layout (no ranks saved it). Committed last, as every
    marker (k2mcore.checkpoint.commit)."""
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "step": 0, "consumed_samples": 0,
        "layout": {"converted": True}, "optimizer": None, "scheduler": None, "model": model,
        "versions": versions(), "files": dict(sorted(files.items())), **(extra or {}),
    }


# --------------------------------------------------------------------------------------------
# Small helpers
def write_json(path: str, obj: Any) -> None:
    """Write through `<path>.part`, fsync, rename: a reader sees the whole file or none."""
    part = path + ".part"
    with open(part, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None


def first_line(exc: BaseException) -> str:
    """An exception's first line, without terminal colour codes, for one-line errors."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0][:300] if text else ""


def versions() -> dict:
    """torch's and megatron-core's versions, for the marker. Reads installed metadata rather than
    importing either (the converters never import megatron); torch's own `__version__` (with its
    local build tag) when torch is already loaded, as it always is where a checkpoint is written."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> Optional[str]:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    torch = sys.modules.get("torch")
    return {"torch": getattr(torch, "__version__", None) or installed("torch"),
            "megatron_core": installed("megatron-core")}
