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
from k2mcore.errors import SafetensorsError
from k2mcore.hf.safetensors_io import SafetensorsFile, StreamingWriter

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


# ------------------------------------------------ DCP items without a torch.save per chunk
SHAPES = [(), (1,), (7,), (0, 4), (5, 7), (3, 5, 2), (1, 64, 32)]
DTYPES = [torch.bfloat16, torch.float32, torch.float16, torch.int64]


def _rand(shape, dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=G) * 4).to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN-safe, any dtype)."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cached_legacy_header_plus_bytes_is_what_torch_load_reads(dtype):
    """header + raw bytes loads through torch.load (weights_only, as DCP's reader calls it) as
    the tensor, and parse_item reads it back the same without unpickling."""
    import io

    from k2mcore.convert.items import legacy_header, parse_item, raw_view

    for shape in SHAPES:
        t = _rand(shape, dtype)
        data = legacy_header(dtype, shape) + bytes(raw_view(t))
        assert _same(torch.load(io.BytesIO(data), weights_only=True), t), shape
        fast = parse_item(bytearray(data), dtype, shape)
        assert fast is not None and _same(fast, t), shape


def test_float8_is_refused_by_the_legacy_writer_and_read_by_torch_load(tmp_path):
    """torch's legacy format cannot load float8 back: the writer says so in one line, and a
    float8 item torch DCP wrote (zip) still reads."""
    from k2mcore.convert.items import legacy_header

    assert legacy_header(torch.float8_e4m3fn, (2, 2)) is None
    w = DCPWriter(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="legacy format cannot hold torch.float8_e4m3fn"):
        w.add("f8", torch.zeros(2, 2, dtype=torch.float8_e4m3fn), (2, 2))
    w.abort()
    path = str(tmp_path / "ref")
    t = _rand((4, 4), torch.float8_e4m3fn)
    dcp.save({"f8": t}, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    assert _same(DCPReader(path).read("f8"), t)


def test_parse_item_reads_torch_save_zip_items_and_refuses_what_it_does_not_know():
    """torch.save's zip items (the trainer's DCP saves, zip CRCs off or on) parse to the tensor;
    a view of a larger storage, another shape, or junk gives None (torch.load reads those)."""
    import io

    from torch.utils.serialization import config

    from k2mcore.convert.items import parse_item

    t = _rand((6, 4), torch.bfloat16)
    for crc in (False, True):
        saved = config.save.compute_crc32
        config.save.compute_crc32 = crc
        try:
            buf = io.BytesIO()
            torch.save(t, buf)
        finally:
            config.save.compute_crc32 = saved
        got = parse_item(buf.getvalue(), torch.bfloat16, (6, 4))
        assert got is not None and torch.equal(got, t)
        assert parse_item(buf.getvalue(), torch.bfloat16, (4, 6)) is None
        assert parse_item(buf.getvalue(), torch.float32, (6, 4)) is None
    view = io.BytesIO()
    torch.save(_rand((2, 6, 4), torch.bfloat16)[1], view)  # its storage holds both rows
    assert parse_item(view.getvalue(), torch.bfloat16, (6, 4)) is None
    assert parse_item(b"PK\x03\x04 not a zip", torch.bfloat16, (6, 4)) is None


def test_chunk_written_in_parts_and_from_a_file_loads_with_torch_dcp(tmp_path):
    """begin / write parts / write_from a file's bytes / end: the chunk is the parts
    concatenated along dim 0 (fc1 = gate then up), as torch DCP's own reader loads it."""
    src = str(tmp_path / "src.safetensors")
    gate, up = _rand((3, 8), torch.bfloat16), _rand((3, 8), torch.bfloat16)
    save_file({"gate": gate, "up": up}, src)
    f = SafetensorsFile(src)
    path = str(tmp_path / "dist")
    w = DCPWriter(path)
    for e in range(2):
        w.begin("fc1", torch.bfloat16, (2, 6, 8), (e, 0, 0), (1, 6, 8))
        if e == 0:
            w.write(gate)
            w.write(up)
        else:
            fd, offset, nbytes = f.locate("gate")
            assert w.write_from(fd, offset, nbytes)
            w.write(up)
        w.end()
    w.close()
    f.close()
    want = {"fc1": torch.zeros(2, 6, 8, dtype=torch.bfloat16)}
    dcp.load(want, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    fc1 = torch.cat([gate, up])
    assert torch.equal(want["fc1"][0], fc1) and torch.equal(want["fc1"][1], fc1)
    w = DCPWriter(str(tmp_path / "short"))
    w.begin("x", torch.float32, (4,), (0,), (4,))
    w.write(torch.zeros(2))
    with pytest.raises(ValueError, match="x: chunk closed 8 bytes short"):
        w.end()
    with pytest.raises(ValueError, match="more elements written than the chunk holds"):
        w.write(torch.zeros(3))
    w.abort()


def test_dcp_items_parse_fast_and_rows_read_alone(tmp_path):
    path = str(tmp_path / "dist")
    w = DCPWriter(path)
    full = _rand((4, 6, 8), torch.bfloat16)
    for e in range(4):
        w.add("stack", full[e:e + 1], full.shape, (e, 0, 0))
    w.close()
    want = {"stack": torch.zeros_like(full)}
    dcp.load(want, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    assert torch.equal(want["stack"], full)
    r = DCPReader(path)
    for e in range(4):
        fd, offset, nbytes = r.row_location("stack", e)
        assert nbytes == 6 * 8 * 2
        assert os.pread(fd, nbytes, offset) == bytes(full[e].view(torch.uint8).numpy())
        assert torch.equal(r.read("stack", index=e), full[e])
    r.close()
