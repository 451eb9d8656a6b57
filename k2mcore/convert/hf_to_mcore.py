"""Hugging Face K2 / DeepSeek-V3 / Moonlight directory -> k2mcore checkpoint (torch_dist).

Streams: each HF tensor is read (dequantized when block-FP8), mapped to megatron's 1-rank name,
checked against the shape the config implies, cast, and appended to the DCP data files, a few
tensors at a time; a routed expert's bytes, when no cast is needed, go from the safetensors file
straight into the writer's staging buffers. The result is a weights-only k2mcore checkpoint (no optimizer state, step 0)
that `k2m-train --config OUT/config.yaml --set checkpoint.load=OUT` starts from under any
layout, and that `k2mcore.load_model` and `k2m-convert mcore-to-hf` read.

The release's small files (config.json, tokenizer, ...) travel in the checkpoint
(k2mcore.checkpoint.lineage), so the export writes them back. Every tensor of the release is
converted or named: multi-token-prediction layers (DeepSeek-V3's `model.layers.61`), which
k2mcore's model does not build, are refused unless `drop_mtp`, and the drop is recorded.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import time
from typing import Iterator, Optional

import torch

from k2mcore.checkpoint.format import DIST
from k2mcore.checkpoint.lineage import Lineage
from k2mcore.config.schema import K2Config, ModelConfig
from k2mcore.errors import ConvertError, HFFormatError
from k2mcore.hf.config import mtp_layers
from k2mcore.hf.fp8 import SCALE_SUFFIX, block_size
from k2mcore.hf.mapping import (
    GATED_PARTS,
    TensorSource,
    convert_entry,
    hf_names,
    model_config_from_hf,
    read_hf_config,
    walk,
)

from .dcp import DCPWriter
from .output import commit_output, removed_on_error, temporary_output
from .progress import Progress
from .shapes import dcp_key, expected_shapes

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def convert_hf_to_mcore(
    hf_dir: str, out: str, *, dtype: str = "auto", force: bool = False,
    progress: bool = True, file_bytes: int = 2 << 30, drop_mtp: bool = False,
) -> str:
    """Write the checkpoint; returns its path. `dtype`: auto (the HF config's torch_dtype;
    bf16 for FP8 releases), bf16 or fp32. `drop_mtp`: leave a release's MTP layers out."""
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"{hf_dir}: no such directory")
    hf = read_hf_config(hf_dir)
    model = model_config_from_hf(hf, source=os.path.join(hf_dir, "config.json"))
    source = TensorSource(hf_dir, block=block_size(hf))
    target = _target_dtype(hf, dtype, source.fp8)
    dropped = _check_names(source, model, hf, hf_dir, drop_mtp)
    shapes = expected_shapes(model)
    tmp = temporary_output(out, force)
    writer = DCPWriter(os.path.join(tmp, DIST), file_bytes=file_bytes)
    bar = Progress(total_tensors=len(shapes), total_bytes=_source_bytes(hf_dir), enabled=progress,
                   desc="hf-to-mcore")
    seen = set()
    start = time.perf_counter()
    try:
        with removed_on_error(tmp), _aborted_on_error(writer):
            _stream(source, model, shapes, writer, bar, target, seen, hf_dir)
            record = {"hf_dir": os.path.abspath(hf_dir), "model_type": hf.get("model_type"),
                      "fp8": source.fp8, "dtype": str(target).replace("torch.", "")}
            if dropped:
                record["dropped"] = dropped
            lineage = Lineage.of_source(hf_dir, record)
            lineage.write(tmp)
            marker = _write_checkpoint_files(tmp, model, writer, lineage, extra={"source": lineage.record})
    finally:
        bar.close()
        source.close()
    commit_output(tmp, out, marker)  # the marker last: a weights-only checkpoint
    if progress:
        mb = writer.bytes_written / 2**20
        print(f"hf-to-mcore: {len(seen)} tensors, {mb:.1f} MiB in {time.perf_counter() - start:.1f} s -> {out}",
              flush=True)
    return os.path.abspath(out)


def _check_names(source: TensorSource, model: ModelConfig, hf: dict, hf_dir: str,
                 drop_mtp: bool) -> Optional[dict]:
    """Before anything is written: every tensor of the release is one the model reads, or an MTP
    layer's (refused, or with drop_mtp returned as the record of what is left out)."""
    wanted = hf_names(model)
    mtp: dict[int, list[str]] = {}
    for name in source.where:
        base = name[: -len(SCALE_SUFFIX)] if name.endswith(SCALE_SUFFIX) else name
        if base in wanted:
            continue
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer and int(layer[1]) >= model.num_layers:
            mtp.setdefault(int(layer[1]), []).append(name)
            continue
        raise ConvertError(f"{os.path.join(hf_dir, source.where[name])}: tensor {name} is not part of "
                           "the model config.json describes (nothing written)")
    if not mtp:
        return None
    names = [n for ns in mtp.values() for n in ns]
    nbytes = sum(math.prod(s) * d.itemsize
                 for s, d in map(source.shape_dtype, names))
    layers = sorted(mtp)
    what = (f"{len(layers)} multi-token-prediction layer{'s' if len(layers) > 1 else ''} "
            f"(model.layers.{','.join(map(str, layers))}: {len(names)} tensors, {nbytes / 2**20:.1f} MiB; "
            f"config num_nextn_predict_layers={mtp_layers(hf)})")
    if not drop_mtp:
        raise ConvertError(f"{hf_dir}: holds {what}, which k2mcore's model does not build: "
                           "pass --drop-mtp to convert without them")
    print(f"hf-to-mcore: --drop-mtp: leaving out {what}", flush=True)
    return {"mtp_layers": layers, "tensors": len(names), "bytes": nbytes, "by": "--drop-mtp"}


def _stream(source: TensorSource, model: ModelConfig, shapes: dict, writer: DCPWriter, bar: Progress,
            target: torch.dtype, seen: set, hf_dir: str) -> None:
    try:
        for mc, hf, gated in walk(model):
            routed = _ROUTED.match(mc)
            if routed:  # a layer's routed experts, all at once, when the walk reaches expert 0
                if routed[2] == "0":
                    _experts(source, model, routed[1], hf.rsplit(".", 2)[0] + ".", shapes, writer,
                             target, seen, hf_dir, bar)
                continue
            for name, tensor in convert_entry(source, model, mc, hf, gated):
                want = shapes.get(name)
                if want is None:
                    raise ConvertError(f"{hf_dir}: {name} is not part of the model config.json describes")
                _check_shape(hf_dir, name, tuple(tensor.shape), want)
                key, global_shape, offsets, _ = dcp_key(name, want, model)
                writer.add(key, tensor.to(target), global_shape, offsets)
                seen.add(name)
                bar.update(source.bytes_read)
        writer.close()
    except HFFormatError as exc:
        raise ConvertError(str(exc)) from None


_ROUTED = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.$")
def _experts(source: TensorSource, model: ModelConfig, mc: str, hf: str, shapes: dict, writer: DCPWriter,
             target: torch.dtype, seen: set, hf_dir: str, bar: Progress) -> None:
    """One MoE layer's routed experts, one chunk [e] of the stacked key per expert and megatron
    tensor, as megatron's expert layers save them. Each expert's HF tensors are streamed into
    the chunk (gate then up is fc1: no concatenation in memory), their bytes copied from the
    safetensors file straight into the writer's staging buffers where no cast is needed.
    (Chunks of several experts would be fewer items to write, but megatron's load reads a
    stored chunk whole for every expert it overlaps: 20x slower to start training from.)"""
    for e in range(model.num_experts):
        for m_name, parts in GATED_PARTS.items():
            name = f"{mc}local_experts.{e}.{m_name}"
            want = shapes[name]
            key, global_shape, offsets, _ = dcp_key(name, want, model)
            writer.begin(key, target, global_shape, offsets, (1, *want))
            for p in parts:
                hf_name = f"{hf}{e}.{p}"
                where = source.locate(hf_name)
                if where is not None and where[3] == target:  # stored as wanted: its bytes
                    fd, offset, nbytes, _, shape = where
                    _check_shape(hf_dir, name, (shape[0] * len(parts), *shape[1:]), want)
                    if not writer.write_from(fd, offset, nbytes):
                        raise ConvertError(f"{os.path.join(hf_dir, source.where[hf_name])}: "
                                           f"truncated ({hf_name})")
                    continue
                t = source(hf_name)  # dequantized or cast
                _check_shape(hf_dir, name, (t.shape[0] * len(parts), *t.shape[1:]), want)
                writer.write(t.to(target))
            writer.end()
            seen.add(name)
        bar.update(source.bytes_read, tensors=len(GATED_PARTS))


def _check_shape(hf_dir: str, name: str, shape: tuple, want: tuple) -> None:
    if tuple(shape) != tuple(want):
        raise ConvertError(f"{hf_dir}: the tensor for {name} has shape {tuple(shape)}, "
                           f"config.json implies {tuple(want)}")


@contextlib.contextmanager
def _aborted_on_error(writer: DCPWriter) -> Iterator[None]:
    try:
        yield
    except BaseException:
        writer.abort()
        raise


def _target_dtype(hf: dict, dtype: str, fp8: bool) -> torch.dtype:
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ConvertError(f"--dtype {dtype!r}: not one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if fp8:
        return torch.bfloat16
    name = str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(name, torch.bfloat16)


def _source_bytes(hf_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir)
               if f.endswith(".safetensors"))


def _write_checkpoint_files(tmp: str, model: ModelConfig, writer: DCPWriter, lineage: Lineage,
                            extra: Optional[dict] = None) -> dict:
    """config.yaml; returns the marker of a weights-only checkpoint (listing the lineage's files
    too), for the commit to write."""
    from k2mcore.checkpoint.format import CONFIG, DIST, file_entry, weights_only_marker
    from k2mcore.config.loader import dump_yaml

    cfg = K2Config(model=model)
    cfg.run.dir = f"runs/{model.name.replace('/', '_')}"
    dump_yaml(cfg, os.path.join(tmp, CONFIG))
    files = {f"{DIST}/{k}": v for k, v in writer.files.items()}
    files[CONFIG] = file_entry(os.path.join(tmp, CONFIG))
    files.update({rel: file_entry(os.path.join(tmp, rel)) for rel in lineage.files})
    return weights_only_marker(model=model.name, files=files, extra=extra)
