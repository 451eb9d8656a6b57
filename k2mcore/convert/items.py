"""DCP tensor items written and read without a torch.save / torch.load per chunk.

A torch_dist data file is a run of items, each what `torch.save(chunk)` writes, which DCP's reader
`torch.load`s (megatron's, the trainer's). Per chunk both cost about 0.25 ms of pickling,
which for K2's 384 experts x 3 tensors x 61 layers is most of a conversion. DCP has no raw tensor
item (its storage layer always torch.saves), so the bytes stay torch's own, made by torch.save,
but only once per (dtype, shape):

- Writing: torch.save's legacy format is a header (pickles naming dtype, shape and a storage key)
  followed by the storage's bytes. The header of each (dtype, shape) is taken from one torch.save
  (of an uninitialized tensor, its bytes discarded) and reused, its storage key rewritten to "0"
  (legacy files name a storage by its address, and a name is only matched within its file).
- Reading: an item whose header is byte for byte that header (what this writer wrote), or a zip
  item (what the trainer's saves write) whose `data.pkl` is byte for byte torch.save's for a fresh
  tensor of that dtype and shape, is exactly the tensor's raw bytes after it, so they are taken
  as they are. Anything else (a view of a larger storage, another torch's pickles) goes through
  `torch.load(weights_only=True)`, as DCP itself reads it.
"""
from __future__ import annotations

import functools
import io
import struct
from typing import Optional

import torch



def _binunicode(s: bytes) -> bytes:
    """A str as protocol 2 pickles it (how the legacy format pickles storage keys)."""
    return b"X" + struct.pack("<I", len(s)) + s


@functools.lru_cache(maxsize=None)
def legacy_dtype(dtype: torch.dtype) -> bool:
    """Whether torch's legacy format holds `dtype` (it cannot load the float8 types back)."""
    buf = io.BytesIO()
    torch.save(torch.zeros(2, dtype=dtype), buf, _use_new_zipfile_serialization=False)
    try:
        return torch.load(io.BytesIO(buf.getvalue()), weights_only=True).dtype == dtype
    except Exception:
        return False


@functools.lru_cache(maxsize=256)
def legacy_header(dtype: torch.dtype, shape: tuple[int, ...]) -> Optional[bytes]:
    """The bytes torch.save (legacy format) writes before a contiguous tensor's data, with its
    storage key "0"; None for a dtype the format cannot hold. (tests/convert/test_io.py loads
    header + data back for several dtypes and shapes.)"""
    if not legacy_dtype(dtype):
        return None
    probe = torch.empty(shape, dtype=dtype)  # never written: its pages are never touched
    nbytes = probe.numel() * probe.element_size()
    sink = _HeaderSink(nbytes)
    torch.save(probe, sink, _use_new_zipfile_serialization=False)
    header = sink.header()
    key = _binunicode(str(probe.untyped_storage()._cdata).encode())
    if header.count(key) != 2:  # the pickled tensor's persistent id and the storage key list
        raise RuntimeError(f"torch.save's legacy header for {dtype} {shape}: storage key not found twice")
    return header.replace(key, _binunicode(b"0"))


class _HeaderSink:
    """A write-only file that keeps what torch.save writes before the last `nbytes` (the
    storage's bytes, which come last). Small writes are copied (torch reuses its buffers);
    a large one, the data, only counted."""

    LARGE = 1 << 20

    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.parts, self.size = nbytes, [], 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.parts.append(bytes(data) if n < self.LARGE else n)
        self.size += n
        return n

    def flush(self) -> None:
        pass

    def header(self) -> bytes:
        left, out = self.size - self.nbytes, []
        for part in self.parts:
            if left <= 0:
                break
            if isinstance(part, int):
                raise RuntimeError("torch.save's legacy layout: a large write before the data")
            out.append(part[:left])
            left -= len(out[-1])
        return b"".join(out)


@functools.lru_cache(maxsize=256)
def _zip_pickle(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """torch.save's (zip format) data.pkl for a fresh contiguous tensor: deterministic (its one
    storage is named "0")."""
    buf = io.BytesIO()
    torch.save(torch.empty(shape, dtype=dtype), buf)
    return torch._C.PyTorchFileReader(io.BytesIO(buf.getvalue())).get_record("data.pkl")


def raw_view(t: torch.Tensor) -> memoryview:
    """`t`'s bytes, without a copy."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def parse_item(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> Optional[torch.Tensor]:
    """The tensor stored in `data` if it is one of the two known layouts, else None."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    header = legacy_header(dtype, shape)
    if header is not None and len(data) == len(header) + nbytes and data[: len(header)] == header:
        return _from_bytes(memoryview(data)[len(header):], dtype, shape)
    if data[:2] == b"PK":
        try:
            zf = torch._C.PyTorchFileReader(io.BytesIO(data))
            if zf.get_record("data.pkl") != _zip_pickle(dtype, shape) or \
                    zf.get_record("byteorder") != b"little":
                return None
            raw = zf.get_record("data/0") if nbytes else b""
        except RuntimeError:  # not a zip torch.load would read either way
            return None
        if len(raw) == nbytes:
            return _from_bytes(memoryview(raw), dtype, shape)
    return None


def _from_bytes(raw: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not len(raw):
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw) if raw.readonly else raw, dtype=dtype).reshape(shape)
