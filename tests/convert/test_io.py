"""The converters' streaming file I/O against the reference implementations: safetensors files
written here load with the safetensors package, files it wrote read here; torch_dist directories
written here load with torch.distributed.checkpoint, and megatron-written ones read here."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from k2mcore.convert.dcp import DCPReader, DCPWriter
from k2mcore.hf.safetensors_io import SafetensorsError, SafetensorsFile, StreamingWriter

G = torch.Generator().manual_seed(0)
TENSORS = {
    "a.bf16": torch.randn(5, 7, generator=G).to(torch.bfloat16),
    "b.f32": torch.randn(3, generator=G),
    "c.fp8": torch.randn(4, 4, generator=G).to(torch.float8_e4m3fn),
    "d.i64": torch.arange(6).reshape(2, 3),
    "e.empty": torch.zeros(0, 4),
}


def test_streaming_safetensors_writer_is_read_by_safetensors(tmp_path):
    path = str(tmp_path / "x.safetensors")
    w = StreamingWriter(path, [(k, t.dtype, tuple(t.shape)) for k, t in TENSORS.items()])
    for k, t in TENSORS.items():
        w.write(k, t)
    w.close()
    got = load_file(path)
    assert set(got) == set(TENSORS)
    for k, t in TENSORS.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k].view(torch.uint8), t.view(torch.uint8)), k


def test_streaming_writer_refuses_off_plan_tensors(tmp_path):
    w = StreamingWriter(str(tmp_path / "y.safetensors"), [("a", torch.float32, (2,)), ("b", torch.float32, (3,))])
    with pytest.raises(ValueError, match="b out of the planned order"):
        w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="planned F32"):
        w.write("a", torch.zeros(3))


def test_reader_reads_what_safetensors_wrote(tmp_path):
    path = str(tmp_path / "z.safetensors")
    save_file(TENSORS, path)
    f = SafetensorsFile(path)
    for k, t in TENSORS.items():
        assert torch.equal(f.read(k).view(torch.uint8), t.view(torch.uint8)), k
    (tmp_path / "bad.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="bad.safetensors: not a safetensors file"):
        SafetensorsFile(str(tmp_path / "bad.safetensors"))


def test_dcp_writer_output_loads_with_torch_dcp_and_reads_back(tmp_path):
    path = str(tmp_path / "dist")
    w = DCPWriter(path, file_bytes=1000)  # small files: several data files
    full = torch.randn(4, 6, 8, generator=G)
    for e in range(4):  # a stacked expert tensor, one chunk per expert
        w.add("stack", full[e:e + 1], full.shape, (e, 0, 0))
    flat = torch.randn(10, 3, generator=G)
    w.add("flat", flat, flat.shape)
    w.close()
    assert len([f for f in os.listdir(path) if f.endswith(".distcp")]) > 1
    want = {"stack": torch.zeros_like(full), "flat": torch.zeros_like(flat)}
    dcp.load(want, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    assert torch.equal(want["stack"], full) and torch.equal(want["flat"], flat)
    r = DCPReader(path)
    assert torch.equal(r.read("stack"), full) and torch.equal(r.read("stack", index=2), full[2])
    assert set(w.files) == {f for f in os.listdir(path)}  # every file listed with size/CRC


def test_dcp_reader_reads_a_torch_dcp_checkpoint(tmp_path):
    path = str(tmp_path / "ref")
    state = {"w": torch.randn(6, 5, generator=G), "v": torch.randn(3, generator=G)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    r = DCPReader(path)
    assert torch.equal(r.read("w"), state["w"]) and torch.equal(r.read("v"), state["v"])
