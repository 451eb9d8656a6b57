"""Converter output directories: written under a temporary name, renamed into place when
complete, so a crash never leaves something that looks like a finished checkpoint."""
from __future__ import annotations

import contextlib
import os
import shutil
import zlib
from typing import Iterator

from k2mcore.hf.mapping import HFFormatError


class ConvertError(ValueError):
    """Bad converter input or output path, in one line naming the file or tensor."""


def temporary_output(out: str, force: bool) -> str:
    """The temporary directory to write `out` into; refuses an existing `out` without force."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not force:
        raise ConvertError(f"{out}: already exists (pass --force to replace it)")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ConvertError(f"{parent}: no such directory for the output")
    tmp = os.path.join(parent, f".{os.path.basename(out)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


@contextlib.contextmanager
def removed_on_error(tmp: str) -> Iterator[None]:
    """A failed or interrupted conversion leaves no partial directory behind."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_output(tmp: str, out: str) -> None:
    """Replace `out` by the finished `tmp` (the old one is removed only after the rename)."""
    out = os.path.abspath(out)
    old = None
    if os.path.exists(out):
        old = f"{tmp}.old"
        os.rename(out, old)
    os.rename(tmp, out)
    fd = os.open(os.path.dirname(out), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old:
        shutil.rmtree(old, ignore_errors=True)


class CRCFile:
    """A write-only file that keeps the CRC32 and size of what went through it (for the
    checkpoint's file list, without reading the bytes back)."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "wb")
        self.crc, self.size = 0, 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


__all__ = ["CRCFile", "ConvertError", "HFFormatError", "commit_output", "removed_on_error",
           "temporary_output"]
