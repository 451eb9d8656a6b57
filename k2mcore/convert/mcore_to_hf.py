"""k2mcore checkpoint (any layout it was saved in) -> Hugging Face DeepseekV3 directory.

Streams: tensors are read from the torch_dist files chunk by chunk (a routed expert at a time),
mapped to HF names, cast, and written into safetensors shards of at most `shard_bytes`, with
`model.safetensors.index.json`. config.json is the release's, changed only where the checkpoint
differs, or for a model trained from scratch transformers' own (convert.export_config).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import torch

from k2mcore.checkpoint.format import (
    CONFIG,
    DIST,
    MARKER,
    is_checkpoint,
    resolve_checkpoint,
    validate_checkpoint,
)
from k2mcore.errors import CheckpointError, ConvertError, DCPFormatError
from k2mcore.hf.config import HF_DTYPE_NAMES as _HF_NAMES
from k2mcore.hf.mapping import GATED_PARTS, export_entry, mcore_to_hf, walk

from .dcp import DCPReader
from .output import commit_output, removed_on_error, temporary_output
from .progress import Progress
from .shapes import expected_shapes, split_expert_name

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HF_DTYPE_NAMES = {DTYPES[k]: v for k, v in _HF_NAMES.items()}


def open_checkpoint(path: str):
    """(step directory, K2Config, DCPReader) of a k2mcore checkpoint, validated by sizes."""
    from k2mcore.config.loader import load_config
    from k2mcore.errors import ConfigError

    if not os.path.isdir(path):
        raise ConvertError(f"{path}: no such directory")
    if not is_checkpoint(path):
        raise ConvertError(f"{path}: not a k2mcore checkpoint (no {MARKER} marker, and no "
                           "complete step_* directory under it)")
    try:
        step_dir = resolve_checkpoint(path)
        validate_checkpoint(step_dir, checksums=False)
        cfg = load_config(os.path.join(step_dir, CONFIG))
        reader = DCPReader(os.path.join(step_dir, DIST))
    except (CheckpointError, ConfigError, DCPFormatError) as exc:
        raise ConvertError(str(exc)) from None
    return step_dir, cfg, reader


def convert_mcore_to_hf(
    ckpt: str, out: str, *, dtype: str = "bf16", force: bool = False, progress: bool = True,
    shard_bytes: int = 4 << 30, tokenizer: Optional[str] = None,
) -> str:
    """Write the HF directory; returns its path. `tokenizer` names the tokenizer whose bos/eos/pad
    a model trained from scratch gets (default: the checkpoint's data.tokenizer)."""
    from .export_config import export_files

    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: not one of {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    step_dir, cfg, reader = open_checkpoint(ckpt)
    model = cfg.model
    try:
        files = export_files(step_dir, cfg, HF_DTYPE_NAMES[target], tokenizer)
    except BaseException:
        reader.close()
        raise
    shapes = expected_shapes(model)
    for name, shape in shapes.items():  # the config and the stored tensors must agree
        found = split_expert_name(name)
        key = found[0] if found else name
        info = reader.info.get(key)
        want = (model.num_experts, *shape) if found else shape
        if info is None:
            raise ConvertError(f"{step_dir}: tensor {key} is not in the checkpoint")
        if info.shape != want:
            raise ConvertError(f"{step_dir}: tensor {key} has shape {info.shape}, {CONFIG} implies {want}")

    def get(name: str) -> torch.Tensor:
        found = split_expert_name(name)
        return reader.read(found[0], index=found[1]) if found else reader.read(name)

    tmp = temporary_output(out, force)
    total = sum(math.prod(s) for s in shapes.values()) * target.itemsize
    n_hf = len(shapes) + sum(n.endswith("linear_fc1.weight") for n in shapes)  # gate and up apart
    bar = Progress(total_tensors=n_hf, total_bytes=total, enabled=progress, desc="mcore-to-hf")
    # the HF names, dtypes and shapes, from the mapping run on shape-only (meta) tensors
    plan = [(n, target, tuple(t.shape)) for n, t in mcore_to_hf(
        lambda name: torch.empty(shapes[name], device="meta"), model)]
    writer = _ShardWriter(tmp, shard_bytes, plan)
    start = time.perf_counter()
    try:
        with removed_on_error(tmp):
            for mc, hf, gated in walk(model):
                done = writer.count
                if not (gated and _copy_expert(reader, writer, mc, hf, target)):
                    for hf_name, tensor in export_entry(get, model, mc, hf, gated):
                        writer.add(hf_name, tensor.to(target))
                bar.update(writer.bytes, tensors=writer.count - done)
            writer.close()
            _write(os.path.join(tmp, "config.json"), (json.dumps(files.config, indent=2) + "\n").encode())
            for name, data in files.others.items():
                _write(os.path.join(tmp, name), data)
    except DCPFormatError as exc:
        raise ConvertError(str(exc)) from None
    finally:
        writer.abort()  # after close(): nothing left to abort
        bar.close()
        reader.close()
    commit_output(tmp, out)
    if progress:
        print(f"mcore-to-hf: {writer.count} tensors, {writer.bytes / 2**20:.1f} MiB in "
              f"{len(writer.files)} shards in {time.perf_counter() - start:.1f} s -> {out} "
              f"({files.note})", flush=True)
    return os.path.abspath(out)


def _copy_expert(reader: DCPReader, writer: "_ShardWriter", mc: str, hf: str, target: torch.dtype) -> bool:
    """A routed expert stored as the expert groups hf-to-mcore writes, in the exported dtype:
    its HF tensors' bytes copied from the data file into the shard (gate and up are fc1's two
    halves). False, with nothing written, where it is not (then the tensors are read)."""
    found = split_expert_name(mc + "linear_fc1.weight")
    if found is None:
        return False
    copies = []
    for m_name, parts in GATED_PARTS.items():
        key, e = split_expert_name(mc + m_name)
        where = reader.row_location(key, e) if reader.info[key].dtype == target else None
        if where is None:
            return False
        fd, offset, nbytes = where
        part = nbytes // len(parts)
        copies += [(hf + p, fd, offset + j * part, part) for j, p in enumerate(parts)]
    for name, fd, offset, nbytes in copies:
        writer.add_from(name, fd, offset, nbytes)
    return True


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class _ShardWriter:
    """safetensors shards of at most `limit` bytes (a larger tensor gets a shard of its own),
    planned from the tensors' names, dtypes and shapes and then written as a stream, so memory
    holds one tensor at a time whatever the shard size; the index last."""

    def __init__(self, path: str, limit: int, plan: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        self.path = path
        self.shards: list[list] = [[]]
        size = 0
        for item in plan:
            nbytes = math.prod(item[2]) * item[1].itemsize
            if self.shards[-1] and size + nbytes > limit:
                self.shards.append([])
                size = 0
            self.shards[-1].append(item)
            size += nbytes
        n = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.weight_map = {name: self.files[i] for i, shard in enumerate(self.shards) for name, _, _ in shard}
        self.bytes = self.count = 0
        self._shard, self._writer, self._left = -1, None, 0

    def add(self, name: str, t: torch.Tensor) -> None:
        self._next_file()
        self._writer.write(name, t)
        self._left -= 1
        self.bytes += t.numel() * t.element_size()
        self.count += 1

    def add_from(self, name: str, fd: int, offset: int, nbytes: int) -> None:
        """The next tensor's bytes, copied from a file (see StreamingWriter.write_from)."""
        self._next_file()
        self._writer.write_from(name, fd, offset, nbytes)
        self._left -= 1
        self.bytes += nbytes
        self.count += 1

    def _next_file(self) -> None:
        from k2mcore.hf.safetensors_io import StreamingWriter

        if self._left == 0:
            if self._writer is not None:
                self._writer.close()
            self._shard += 1
            self._writer = StreamingWriter(os.path.join(self.path, self.files[self._shard]),
                                           self.shards[self._shard])
            self._left = len(self.shards[self._shard])

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        index = {"metadata": {"total_size": self.bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        with open(os.path.join(self.path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
