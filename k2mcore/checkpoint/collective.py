"""What every rank of a save or load takes part in: agreeing on a flag, gathering and
broadcasting small objects, and the checks of a checkpoint's files before and while it loads
(k2mcore.checkpoint.manager's)."""
from __future__ import annotations

import threading
from typing import Any, Optional

import torch
import torch.distributed as dist

from k2mcore import platform
from k2mcore.errors import CheckpointError

from .format import check_files, read_marker


def collective_validate(path: str) -> tuple[dict, "ChecksumCheck"]:
    """Every rank checks the marker and every file's size (all raise the same first error),
    then starts checking the CRC32s of its share of the files in a thread, while the caller
    loads: the check reads and hashes with the GIL let go, on a core the load leaves idle at
    1 rank (run ahead of the load, it took a fifth of the load's time). The caller joins it before
    it uses anything it loaded (`ChecksumCheck.raise_if_bad`)."""
    try:
        meta = read_marker(path)
        errors = check_files(path, meta, checksums=False)
    except CheckpointError as exc:
        meta, errors = None, [str(exc)]
    first = first_of_all(errors)
    if first:
        raise CheckpointError(first)
    return meta, ChecksumCheck(path, meta)


class ChecksumCheck:
    """This rank's share of the checkpoint's CRC32 checks, in a thread."""

    def __init__(self, path: str, meta: dict) -> None:
        self.errors: list[str] = []
        share = (dist.get_rank(), dist.get_world_size())

        def check() -> None:
            try:
                self.errors = check_files(path, meta, share, True)
            except (CheckpointError, OSError) as exc:
                self.errors = [str(exc)]

        self._thread = threading.Thread(target=check, name="k2m-verify", daemon=True)
        self._thread.start()

    def raise_if_bad(self) -> None:
        """Collective: the first bad file of any rank, raised on every rank."""
        self._thread.join()
        first = first_of_all(self.errors)
        if first:
            raise CheckpointError(first)


def first_of_all(errors: list[str]) -> Optional[str]:
    """The first of every rank's first error (collective)."""
    return next((e[0] for e in all_gather(errors[:1]) if e), None)


def all_true(flag: bool) -> bool:
    """True on every rank when `flag` is true on every rank (one small all-reduce)."""
    box = torch.tensor([0.0 if flag else 1.0], device=platform.device())
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return box.item() == 0.0


def all_gather(obj: Any) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
