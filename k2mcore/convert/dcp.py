"""Streaming reader and writer for torch_dist (torch.distributed.checkpoint) directories.

Why not torch's DCP save/load or megatron's dist_checkpointing here: both plan a whole state
dict at once (every tensor in memory, plus a process group); converting a 1 TB model must
hold a few tensors at a time. The on-disk format is DCP's FileSystemWriter's, item for item:
each chunk `torch.save`d into a data file, and a pickled `Metadata` (tensor shapes, chunk
offsets, and where each chunk's bytes are) in `.metadata`. Directories written here load
through megatron's dist-checkpointing like any other, under any parallel layout; directories
megatron wrote are read here chunk by chunk, their `.metadata` through the trainer's
allow-listed unpickler (k2mcore.checkpoint.dcp_reader).
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import uuid
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from k2mcore.checkpoint.dcp_reader import read_dcp_metadata
from k2mcore.errors import CheckpointError, DCPFormatError

from .items import legacy_header, parse_item, raw_view

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}


COMMON_STATE_KEY = "common_state/shard_0_1"  # ShardedObject('common_state', ...).unique_key


class DCPWriter:
    """Write chunks of global tensors one at a time; `close()` writes the metadata last.

    Data files roll over at `file_bytes`. Nothing marks the directory complete until close():
    callers write into a temporary directory and rename it (see convert.hf_to_mcore).
    """

    def __init__(self, path: str, *, file_bytes: int = 2 << 30) -> None:
        os.makedirs(path, exist_ok=True)
        self.path, self.file_bytes = path, file_bytes
        self._tensors: dict[str, TensorStorageMetadata] = {}
        self._storage: dict[MetadataIndex, _StorageInfo] = {}
        self._file_index, self._stream = -1, None
        self.bytes_written = 0
        #: {file name: {"size", "crc32"}} of every finished file, for the checkpoint's list
        self.files: dict[str, dict[str, int]] = {}
        self._open: Optional[tuple] = None  # the chunk being written (begin .. end)
        self._left = 0
        self._roll()

    def _roll(self) -> None:
        from k2mcore.checkpoint.writer import ChecksummingStream

        if self._stream is not None:
            self._stream.close()
            self.files[self._name] = {"size": self._stream.size, "crc32": self._stream.crc}
        self._file_index += 1
        self._name = f"__0_{self._file_index}.distcp"
        # the trainer's stream: CRC32 for the manifest as it writes, O_DIRECT, fsync at close
        self._stream = ChecksummingStream(os.path.join(self.path, self._name), sync=True)

    def add(self, key: str, chunk: torch.Tensor, global_shape: Sequence[int],
            offsets: Optional[Sequence[int]] = None) -> None:
        """`chunk` is global[offsets : offsets + chunk.shape] of the tensor `key`."""
        self.begin(key, chunk.dtype, global_shape, offsets or (0,) * chunk.ndim, chunk.shape)
        self.write(chunk)
        self.end()

    def begin(self, key: str, dtype: torch.dtype, global_shape: Sequence[int], offsets: Sequence[int],
              sizes: Sequence[int]) -> None:
        """Open the chunk global[offsets : offsets + sizes] of `key`; `write` its elements in
        order (parts that concatenate along dim 0, e.g. one expert after another), then `end`."""
        offsets, sizes, global_shape = tuple(offsets), tuple(sizes), tuple(global_shape)
        if self._open is not None:
            raise ValueError(f"{key}: chunk {self._open[0]} is still open")
        if not len(offsets) == len(sizes) == len(global_shape):
            raise ValueError(f"{key}: chunk rank {len(sizes)} vs offsets {offsets} / shape {global_shape}")
        meta = self._tensors.get(key)
        if meta is None:
            meta = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(global_shape), [])
            self._tensors[key] = meta
        elif tuple(meta.size) != global_shape or meta.properties.dtype != dtype:
            raise ValueError(f"{key}: chunks disagree on the global shape or dtype")
        if self._stream.tell() >= self.file_bytes:
            self._roll()
        # what torch.save (legacy format) writes, its header made once per dtype and shape
        # (convert.items): DCP's reader torch.loads it like any item
        header = legacy_header(dtype, sizes)
        if header is None:
            raise ValueError(f"{key}: torch's legacy format cannot hold {dtype}")
        start = self._stream.tell()
        self._stream.write(header)
        nbytes = math.prod(sizes) * dtype.itemsize
        self._open = (key, meta, offsets, sizes, start, nbytes)
        self._left = nbytes

    def write(self, part: torch.Tensor) -> None:
        """The open chunk's next elements (in C order)."""
        if self._open is None or part.dtype != self._open[1].properties.dtype:
            raise ValueError(f"{self._open and self._open[0]}: no open chunk of dtype {part.dtype}")
        part = part.detach().cpu().contiguous()
        nbytes = part.numel() * part.element_size()
        if nbytes > self._left:
            raise ValueError(f"{self._open[0]}: more elements written than the chunk holds")
        self._stream.write(raw_view(part))
        self._left -= nbytes

    def write_from(self, fd: int, offset: int, nbytes: int) -> bool:
        """The open chunk's next elements, copied from the file `fd` (stored in the chunk's
        dtype, C order) straight into the stream's staging buffers. False if the file ended
        first."""
        if self._open is None or nbytes > self._left:
            raise ValueError(f"{self._open and self._open[0]}: more bytes than the chunk holds")
        got = self._stream.write_from(fd, offset, nbytes)
        self._left -= got
        return got == nbytes

    def end(self) -> None:
        key, meta, offsets, sizes, start, nbytes = self._open
        if self._left:
            raise ValueError(f"{key}: chunk closed {self._left} bytes short")
        self._open = None
        index = MetadataIndex(key, torch.Size(offsets), len(meta.chunks))
        meta.chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        self._storage[index] = _StorageInfo(self._name, start, self._stream.tell() - start)
        self.bytes_written += nbytes

    def abort(self) -> None:
        """Stop writing (a failed conversion; its directory is removed)."""
        if self._stream is not None and not self._stream.closed:
            self._stream.abort()

    def add_bytes(self, key: str, data: bytes) -> None:
        """A bytes item (how DCP stores megatron's ShardedObjects), written raw."""
        start = self._stream.tell()
        self._stream.write(data)
        self._tensors[key] = BytesStorageMetadata()
        self._storage[MetadataIndex(key)] = _StorageInfo(self._name, start, len(data))

    def close(self) -> None:
        # megatron's non-sharded ("common") state, none here, where megatron >= 0.19 keeps it:
        # a ShardedObject 'common_state' inside the DCP files (older releases: common.pt)
        common = io.BytesIO()
        torch.save([{}], common)
        self.add_bytes(COMMON_STATE_KEY, common.getvalue())
        self._roll()  # closes (fsyncs) the last data file
        self._stream.close()
        os.remove(os.path.join(self.path, self._name))  # the empty file _roll just opened
        metadata = Metadata(state_dict_metadata=self._tensors, planner_data=None,
                            storage_data=self._storage,
                            storage_meta=StorageMeta(checkpoint_id=None, save_id=uuid.uuid4().hex))
        # dist/metadata.json is megatron's own (its backend), not k2mcore's checkpoint marker
        small = {".metadata": pickle.dumps(metadata), "metadata.json": json.dumps(MEGATRON_METADATA).encode()}
        for name, data in small.items():
            with open(os.path.join(self.path, name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.files[name] = {"size": len(data), "crc32": zlib.crc32(data)}


@dataclass
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[ChunkStorageMetadata]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class DCPReader:
    """Read a torch_dist directory's tensors chunk by chunk (never a whole file)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.metadata = read_dcp_metadata(os.path.join(path, ".metadata"))
        except CheckpointError as exc:
            raise DCPFormatError(str(exc)) from None
        self._where = self.metadata.storage_data
        self._fds: dict[str, int] = {}  # one descriptor per data file, read with pread
        self._by_row: dict[str, dict[int, list]] = {}
        self._legacy: set[tuple[str, int]] = set()  # chunks whose header _read_row has checked
        #: every tensor's global shape, dtype and stored chunks, by key
        self.info: dict[str, TensorInfo] = {
            key: TensorInfo(key, tuple(meta.size), meta.properties.dtype, list(meta.chunks))
            for key, meta in self.metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata)
        }

    def read_chunk(self, key: str, index: int, chunk: ChunkStorageMetadata) -> torch.Tensor:
        info = self._where.get(MetadataIndex(key, chunk.offsets, index)) or self._where.get(
            MetadataIndex(key, chunk.offsets))
        if info is None:
            raise DCPFormatError(f"{self.path}: no storage entry for {key} at {tuple(chunk.offsets)}")
        if getattr(info, "transform_descriptors", None):
            raise DCPFormatError(f"{self.path}: {key} is stored with transforms "
                                 f"{info.transform_descriptors} (compressed); not supported")
        file = os.path.join(self.path, info.relative_path)
        data = bytearray(info.length)  # writable: the tensor is made over it, no copy
        try:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            got = os.preadv(fd, [data], info.offset)
        except OSError as exc:
            raise DCPFormatError(f"{file}: {exc.strerror or exc}") from None
        if got != info.length:
            raise DCPFormatError(f"{file}: truncated ({key} needs bytes {info.offset}..{info.offset + info.length})")
        dtype = self.info[key].dtype
        t = parse_item(data, dtype, tuple(chunk.sizes))
        if t is None:  # not a layout convert.items knows: torch's own reading
            t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if tuple(t.shape) != tuple(chunk.sizes):
            # DCP may store a chunk whose storage is larger than the chunk; narrow to it
            for dim, size in enumerate(chunk.sizes):
                t = t.narrow(dim, 0, size)
        return t

    def row_location(self, key: str, row: int) -> Optional[tuple[int, int, int]]:
        """(descriptor, offset, bytes) of row `row` (of dim 0: an expert) of `key` where one
        chunk holds it in convert.items' legacy layout (what hf-to-mcore writes): its bytes can
        be copied without a tensor, or read alone. None for any other layout."""
        info = self.info.get(key)
        chunks = self._covering(key, info, row) if info is not None else []
        if len(chunks) != 1:
            return None
        index, chunk = chunks[0]
        where = self._where.get(MetadataIndex(key, chunk.offsets, index)) or self._where.get(
            MetadataIndex(key, chunk.offsets))
        sizes = tuple(chunk.sizes)
        if where is None or getattr(where, "transform_descriptors", None) or sizes[1:] != info.shape[1:]:
            return None
        header = legacy_header(info.dtype, sizes)
        if header is None:
            return None
        row_bytes = math.prod(sizes[1:]) * info.dtype.itemsize
        if where.length != len(header) + sizes[0] * row_bytes:
            return None
        file = os.path.join(self.path, where.relative_path)
        try:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            if (file, where.offset) not in self._legacy:  # the header checked once per chunk
                if os.pread(fd, len(header), where.offset) != header:
                    return None
                self._legacy.add((file, where.offset))
        except OSError as exc:
            raise DCPFormatError(f"{file}: {exc.strerror or exc}") from None
        return fd, where.offset + len(header) + (row - chunk.offsets[0]) * row_bytes, row_bytes

    def _read_row(self, key: str, row: int) -> Optional[torch.Tensor]:
        """Row `row` of `key` read alone (see row_location), or None."""
        where = self.row_location(key, row)
        if where is None:
            return None
        fd, offset, nbytes = where
        info = self.info[key]
        if not nbytes:
            return torch.empty(info.shape[1:], dtype=info.dtype)
        buf = bytearray(nbytes)
        try:
            got = os.preadv(fd, [buf], offset)
        except OSError as exc:
            raise DCPFormatError(f"{self.path}: {key}: {exc.strerror or exc}") from None
        if got != nbytes:
            raise DCPFormatError(f"{self.path}: a data file is truncated ({key} row {row})")
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape[1:])

    def _covering(self, key: str, info: TensorInfo, index: int) -> list:
        """The (chunk number, chunk) pairs holding slice [index] of dim 0 (indexed once per key,
        so reading E experts one by one is not O(E^2))."""
        table = self._by_row.get(key)
        if table is None:
            table = self._by_row[key] = {}
            for i, chunk in enumerate(info.chunks):
                for row in range(chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]):
                    table.setdefault(row, []).append((i, chunk))
        return table.get(index, [])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, key: str, index: Optional[int] = None) -> torch.Tensor:
        """The full tensor, or with `index` the slice [index] along dim 0 (an expert of a
        stacked expert tensor), assembled from the chunks that overlap it."""
        info = self.info.get(key)
        if info is None:
            raise DCPFormatError(f"{self.path}: no tensor {key}")
        shape = info.shape if index is None else info.shape[1:]
        chunks = list(enumerate(info.chunks) if index is None else self._covering(key, info, index))
        if len(chunks) == 1:  # one stored chunk is the whole answer (the usual case): no copy
            i, chunk = chunks[0]
            if index is not None:
                row = self._read_row(key, index)  # an expert, its bytes alone
                if row is not None:
                    return row
            t = self.read_chunk(key, i, chunk)
            t = t if index is None else t[index - chunk.offsets[0]]
            if tuple(t.shape) == tuple(shape):
                return t
        out = torch.empty(shape, dtype=info.dtype)
        covered = 0
        for i, chunk in chunks:
            offs, sizes = list(chunk.offsets), list(chunk.sizes)
            t = self.read_chunk(key, i, chunk)
            if index is not None:
                t = t[index - offs[0]]
                offs, sizes = offs[1:], sizes[1:]
            region = out
            for dim, (o, s) in enumerate(zip(offs, sizes)):
                region = region.narrow(dim, o, s)
            region.copy_(t)
            covered += t.numel()
        if covered != out.numel():
            raise DCPFormatError(f"{self.path}: {key} is incomplete ({covered} of {out.numel()} elements stored)")
        return out
