"""Atomic commit of a finished directory, and keep-K pruning.

A directory is written under a temporary name, its marker last, then renamed into place: readers
see it complete or not at all, and a crash leaves the previous one in place. The trainer's
checkpoints and the converters' outputs both go through here.

`Committer` is an object so that a test can pass one that fails part-way (see
tests/checkpoint/ckpt_worker.py); the checkpoint manager calls nothing else to publish a save.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

from .format import MARKER, TMP_PREFIX, TRASH_PREFIX, complete_steps, write_json


class Committer:
    """Publishes finished directories by rename, and removes old or unfinished ones."""

    def prepare(self, tmp: str, subdirs: tuple[str, ...] = ()) -> str:
        """A fresh, empty `tmp` (whatever a crashed attempt left there is removed first)."""
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for sub in subdirs:
            os.makedirs(os.path.join(tmp, sub))
        return tmp

    def commit(self, tmp: str, final: str, marker: Optional[dict] = None) -> None:
        """Write `marker` (if any) into tmp as its metadata.json, then make tmp `final` by one
        rename. An existing `final` (the same step saved again after a resume, or a converter's
        --force) is renamed aside first and removed only once the new one is in place."""
        if marker is not None:
            write_json(os.path.join(tmp, MARKER), marker)
        _fsync_dir(tmp)
        root = os.path.dirname(os.path.abspath(final))
        trash = os.path.join(root, TRASH_PREFIX + os.path.basename(final).lstrip("."))
        if os.path.lexists(final):
            _remove(trash)
            os.rename(final, trash)
        os.rename(tmp, final)
        _fsync_dir(root)
        _remove(trash)

    def discard(self, tmp: str) -> None:
        """Remove an unfinished temporary directory."""
        shutil.rmtree(tmp, ignore_errors=True)

    def prune(self, root: str, keep: int, newest: str) -> list[str]:
        """Keep the last `keep` complete checkpoints under root (keep <= 0: all) and `newest`;
        drop stale `.tmp_step_*` directories. Incomplete `step_*` directories are left alone.

        Each victim is renamed to `.trash_*` here, so a crash mid-delete never leaves a
        half-deleted directory that still carries its marker; the renamed ones (and any trash a
        crash left) are returned for `remove`, which the trainer runs in the background: on this
        ext4 (mounted with discard) deleting a checkpoint costs as much as a fifth of a save.
        """
        done = [p for _, p in complete_steps(root)]
        victims = [p for p in done[:-keep] if p != newest] if keep > 0 else []
        victims += [os.path.join(root, n) for n in os.listdir(root) if n.startswith(TMP_PREFIX)]
        trash = [os.path.join(root, n) for n in os.listdir(root) if n.startswith(TRASH_PREFIX)]
        for path in victims:
            moved = os.path.join(root, TRASH_PREFIX + os.path.basename(path).lstrip("."))
            _remove(moved)
            os.rename(path, moved)
            trash.append(moved)
        return trash

    def remove(self, paths: list[str]) -> None:
        """Delete what `prune` set aside (best effort: what is left is only trash)."""
        for path in paths:
            _remove(path)


def _remove(path: str) -> None:
    """Remove a directory tree or a file, if there; best effort (what is left is only trash)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except OSError:
            pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
