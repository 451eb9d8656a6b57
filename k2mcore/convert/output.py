"""Converter output directories: written under a temporary name, renamed into place when
complete (the trainer's atomic commit, k2mcore.checkpoint.commit), so a crash never leaves
something that looks like a finished checkpoint."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

from k2mcore.checkpoint.commit import Committer
from k2mcore.errors import ConvertError, HFFormatError

_COMMITTER = Committer()


def temporary_output(out: str, force: bool) -> str:
    """The temporary directory to write `out` into; refuses an existing `out` without force."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not force:
        raise ConvertError(f"{out}: already exists (pass --force to replace it)")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ConvertError(f"{parent}: no such directory for the output")
    return _COMMITTER.prepare(os.path.join(parent, f".{os.path.basename(out)}.partial-{os.getpid()}"))


@contextlib.contextmanager
def removed_on_error(tmp: str) -> Iterator[None]:
    """A failed or interrupted conversion leaves no partial directory behind."""
    try:
        yield
    except BaseException:
        _COMMITTER.discard(tmp)
        raise


def commit_output(tmp: str, out: str, marker: Optional[dict] = None) -> None:
    """Replace `out` by the finished `tmp`, writing `marker` (a checkpoint's metadata.json) last;
    an old `out` is removed only after the rename."""
    _COMMITTER.commit(tmp, os.path.abspath(out), marker)


__all__ = ["ConvertError", "HFFormatError", "commit_output", "removed_on_error",
           "temporary_output"]
