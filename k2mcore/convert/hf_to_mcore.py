"""Hugging Face K2 / DeepSeek-V3 / Moonlight directory -> k2mcore checkpoint (torch_dist).

Streams: each HF tensor is read (dequantized when block-FP8), mapped to megatron's 1-rank name,
checked against the shape the config implies, cast, and appended to the DCP data files, a few
tensors at a time. The result is a weights-only k2mcore checkpoint (no optimizer state, step 0)
that `k2m-train --config OUT/config.yaml --set checkpoint.load=OUT` starts from under any
layout, and that `k2mcore.load_model` and `k2m-convert mcore-to-hf` read.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch

from k2mcore.checkpoint.format import DIST
from k2mcore.config.schema import K2Config, ModelConfig
from k2mcore.hf.mapping import HFFormatError, TensorSource, hf_to_mcore, model_config_from_hf, read_hf_config

from .dcp import DCPWriter
from k2mcore.hf.fp8 import block_size
from .output import ConvertError, commit_output, removed_on_error, temporary_output
from .progress import Progress
from .shapes import dcp_key, expected_shapes

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def convert_hf_to_mcore(
    hf_dir: str, out: str, *, dtype: str = "auto", force: bool = False,
    progress: bool = True, file_bytes: int = 2 << 30,
) -> str:
    """Write the checkpoint; returns its path. `dtype`: auto (the HF config's torch_dtype;
    bf16 for FP8 releases), bf16 or fp32."""
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"{hf_dir}: no such directory")
    hf = read_hf_config(hf_dir)
    model = model_config_from_hf(hf, source=os.path.join(hf_dir, "config.json"))
    source = TensorSource(hf_dir, block=block_size(hf))
    target = _target_dtype(hf, dtype, source.fp8)
    shapes = expected_shapes(model)
    tmp = temporary_output(out, force)
    writer = DCPWriter(os.path.join(tmp, DIST), file_bytes=file_bytes)
    bar = Progress(total_tensors=len(shapes), total_bytes=_source_bytes(hf_dir), enabled=progress,
                   desc="hf-to-mcore")
    seen = set()
    start = time.perf_counter()
    try:
        with removed_on_error(tmp):
            _stream(source, model, shapes, writer, bar, target, seen, hf_dir)
            marker = _write_checkpoint_files(tmp, model, writer, extra={
                "source": {"hf_dir": os.path.abspath(hf_dir), "model_type": hf.get("model_type"),
                           "fp8": source.fp8, "dtype": str(target).replace("torch.", "")}})
    finally:
        bar.close()
        source.close()
    commit_output(tmp, out, marker)  # the marker last: a weights-only checkpoint
    if progress:
        mb = writer.bytes_written / 2**20
        print(f"hf-to-mcore: {len(seen)} tensors, {mb:.1f} MiB in {time.perf_counter() - start:.1f} s -> {out}",
              flush=True)
    return os.path.abspath(out)


def _stream(source: TensorSource, model: ModelConfig, shapes: dict, writer: DCPWriter, bar: Progress,
            target: torch.dtype, seen: set, hf_dir: str) -> None:
    try:
        for name, tensor in hf_to_mcore(source, model):
            want = shapes.get(name)
            if want is None:
                raise ConvertError(f"{hf_dir}: {name} is not part of the model config.json describes")
            if tuple(tensor.shape) != want:
                raise ConvertError(f"{hf_dir}: the tensor for {name} has shape {tuple(tensor.shape)}, "
                                   f"config.json implies {want}")
            key, global_shape, offsets, expert = dcp_key(name, want, model)
            tensor = tensor.to(target)
            writer.add(key, tensor if expert is None else tensor.unsqueeze(0), global_shape, offsets)
            seen.add(name)
            bar.update(source.bytes_read)
        writer.close()
    except HFFormatError as exc:
        raise ConvertError(str(exc)) from None


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


def _write_checkpoint_files(tmp: str, model: ModelConfig, writer: DCPWriter, extra: Optional[dict] = None) -> dict:
    """config.yaml; returns the marker of a weights-only checkpoint, for the commit to write."""
    from k2mcore.checkpoint.format import CONFIG, DIST, file_entry, weights_only_marker
    from k2mcore.config.loader import dump_yaml

    cfg = K2Config(model=model)
    cfg.run.dir = f"runs/{model.name.replace('/', '_')}"
    dump_yaml(cfg, os.path.join(tmp, CONFIG))
    files = {f"{DIST}/{k}": v for k, v in writer.files.items()}
    files[CONFIG] = file_entry(os.path.join(tmp, CONFIG))
    return weights_only_marker(model=model.name, files=files, extra=extra)
