"""Reading torch DCP's `.metadata` without unrestricted pickle.

`.metadata` is a pickle; loading one with pickle.load would run whatever code a planted file
names. Here it goes through an unpickler that constructs only torch's inert metadata classes,
and megatron's torch_dist loader is made to read through the same (`restricted_unpickling`,
which also forces torch.load to weights_only; k2mcore.compat.dist_checkpoint swaps the reader).
The converters' streaming reader (k2mcore.convert.dcp) reads `.metadata` here too.
"""
from __future__ import annotations

import contextlib
import os
import pickle
from typing import Any, Iterator

import torch

from k2mcore.compat.dist_checkpoint import restricted_reader
from k2mcore.errors import CheckpointError

from .format import first_line

# What a DCP `.metadata` pickle may name: torch's metadata dataclasses, dtypes, Size, layouts,
# and the path the writer records as checkpoint id. All are inert to construct.
_DCP_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    *(("torch.distributed.checkpoint.planner", n) for n in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def read_dcp_metadata(path: str) -> Any:
    """DCP's `.metadata` through the allow-listed unpickler; file names checked to stay inside."""
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the checkpoint") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt or unsafe DCP metadata "
                              f"({type(exc).__name__}: {first_line(exc)})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{path}: corrupt DCP metadata (not a Metadata object)")
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
            raise CheckpointError(f"{path}: corrupt DCP metadata (file name {rel!r})")
    return md


def safe_reader_class() -> type:
    """torch's FileSystemReader with `.metadata` read by `read_dcp_metadata` (once).

    Built on first use: torch.distributed.checkpoint is not imported with this module."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeMetadataReader(FileSystemReader):
        def __init__(self, path: Any) -> None:
            super().__init__(path)
            self._metadata = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise CheckpointError(f"{self.path}: per-rank DCP metadata is not supported")
            if self._metadata is None:
                self._metadata = read_dcp_metadata(os.path.join(str(self.path), ".metadata"))
            if getattr(self._metadata, "storage_meta", None) is None:
                self._metadata.storage_meta = StorageMeta()
            self._metadata.storage_meta.load_id = self.load_id
            return self._metadata

    return SafeMetadataReader


@contextlib.contextmanager
def restricted_unpickling() -> Iterator[None]:
    """While loading: megatron's DCP readers read `.metadata` through the allow-list, and every
    torch.load runs with weights_only forced on (k2mcore.compat.dist_checkpoint)."""
    with restricted_reader(safe_reader_class()) as used:
        yield
    if not used:  # a megatron that reads another way must not slip past the allow-list
        raise CheckpointError("megatron's torch_dist loader did not use the restricted reader")
