"""safetensors read one tensor at a time with pread, and written as a stream.

Why not the safetensors package here: `safe_open` memory-maps the whole file, and every page a
converter touches stays in its resident set until the file is closed (a K2 release shard is
about 5 GB), and `save_file` needs every tensor of a shard in memory at once. The format is a
little-endian u64 header length, a JSON header ({name: {dtype, shape, data_offsets}},
"__metadata__"), then the tensors' bytes; files written here load with the safetensors package
and transformers like any other.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Optional, Sequence

import torch

from k2mcore.errors import SafetensorsError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}


def read_header(path: str) -> tuple[dict, int]:
    """(header without __metadata__, offset of the data section)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise SafetensorsError(f"{path}: not a safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise SafetensorsError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, SafetensorsError):
            raise
        raise SafetensorsError(f"{path}: not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsFile:
    """Tensors of one file by name, each read on its own (no mapping of the file)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: Optional[int] = None  # opened at the first read, kept until close()
        self.header, self.data_start = read_header(path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self.header)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        entry = self.header[name]
        return tuple(entry["shape"]), DTYPES[entry["dtype"]]

    def locate(self, name: str) -> tuple[int, int, int]:
        """(descriptor, offset, bytes) of a tensor's data, for a reader that copies the bytes
        itself (StreamingWriter.write_from)."""
        entry = self.header.get(name)
        if entry is None:
            raise SafetensorsError(f"{self.path}: no tensor {name}")
        begin, end = entry["data_offsets"]
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise SafetensorsError(f"{self.path}: {exc.strerror or exc}") from None
        return self._fd, self.data_start + begin, end - begin

    def read(self, name: str) -> torch.Tensor:
        entry = self.header.get(name)
        if entry is None:
            raise SafetensorsError(f"{self.path}: no tensor {name}")
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise SafetensorsError(f"{self.path}: {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        buf = bytearray(end - begin)
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            got = os.preadv(self._fd, [buf], self.data_start + begin) if buf else 0
        except OSError as exc:
            raise SafetensorsError(f"{self.path}: {exc.strerror or exc}") from None
        if got != end - begin:
            raise SafetensorsError(f"{self.path}: truncated ({name} needs {end - begin} bytes)")
        shape = tuple(entry["shape"])
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


class StreamingWriter:
    """Writes one safetensors file whose tensors (names, dtypes, shapes, in order) are known
    up front: the header first, then each tensor as it comes."""

    def __init__(self, path: str, plan: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Optional[dict] = None) -> None:
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in plan:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.path, self._order, self._next = path, [p[0] for p in plan], 0
        self._header = header
        # the trainer's O_DIRECT staging stream (no CRC32: nothing lists these files' checksums)
        from k2mcore.checkpoint.writer import ChecksummingStream

        self._f = ChecksummingStream(path, sync=True, checksum=False)
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        if self._next >= len(self._order) or name != self._order[self._next]:
            raise ValueError(f"{self.path}: {name} out of the planned order")
        entry = self._header[name]
        if NAMES.get(t.dtype) != entry["dtype"] or list(t.shape) != entry["shape"]:
            raise ValueError(f"{self.path}: {name} is {t.dtype} {tuple(t.shape)}, planned "
                             f"{entry['dtype']} {tuple(entry['shape'])}")
        t = t.detach().cpu().contiguous()
        if t.numel():
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B"))
        self._next += 1

    def write_from(self, name: str, fd: int, offset: int, nbytes: int) -> None:
        """The next planned tensor's bytes, copied from the file `fd` (stored in its dtype and
        C order), straight into the output's staging buffers."""
        if self._next >= len(self._order) or name != self._order[self._next]:
            raise ValueError(f"{self.path}: {name} out of the planned order")
        begin, end = self._header[name]["data_offsets"]
        if nbytes != end - begin:
            raise ValueError(f"{self.path}: {name} is {nbytes} bytes, planned {end - begin}")
        if self._f.write_from(fd, offset, nbytes) != nbytes:
            raise OSError(f"{name}: the source ended before its {nbytes} bytes")
        self._next += 1

    def abort(self) -> None:
        """Stop without finishing the file (a failed export; its directory is removed)."""
        self._f.abort()

    def close(self) -> None:
        if self._next != len(self._order):
            self._f.abort()
            raise ValueError(f"{self.path}: {len(self._order) - self._next} planned tensors not written")
        self._f.close()  # writes what is staged, fsyncs
