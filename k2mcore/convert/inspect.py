"""What a checkpoint holds: format, model config, the layout it was saved in, tensor count,
bytes and dtypes, FP8 or not. Reads metadata and headers only."""
from __future__ import annotations

import math
import os
import re
from collections import Counter

from k2mcore.config.schema import ModelConfig
from k2mcore.errors import ConvertError


def describe(path: str) -> str:
    from k2mcore.checkpoint.format import is_checkpoint

    if not os.path.isdir(path):
        raise ConvertError(f"{path}: no such directory")
    if is_checkpoint(path):
        return _describe_k2mcore(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return _describe_hf(path)
    raise ConvertError(f"{path}: not a checkpoint (neither a k2mcore checkpoint nor a Hugging Face "
                       "directory with config.json)")


def _model_line(m: ModelConfig) -> str:
    q = f"q_lora {m.q_lora_rank}" if m.q_lora_rank else "plain q_proj"
    return (f"{m.num_layers} layers ({m.first_k_dense} dense), hidden {m.hidden_size}, "
            f"{m.num_attention_heads} heads, {q}, kv_lora {m.kv_lora_rank}, {m.num_experts} experts "
            f"top-{m.moe_topk} (+{m.num_shared_experts} shared), vocab {m.vocab_size}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _describe_k2mcore(path: str) -> str:
    from k2mcore.checkpoint.format import read_marker
    from k2mcore.checkpoint.lineage import Lineage

    from .mcore_to_hf import open_checkpoint

    step_dir, cfg, reader = open_checkpoint(path)
    model = cfg.model
    meta = read_marker(step_dir)
    layout = meta["layout"]
    lineage = Lineage.read(step_dir)
    src = lineage.record or meta.get("source") or {}
    if layout.get("converted"):
        saved = f"converted from Hugging Face ({src.get('model_type')}, FP8 source: {src.get('fp8')})"
    else:
        saved = (f"{layout.get('world_size')} ranks: TP{layout.get('tp')} PP{layout.get('pp')}"
                 f"{' VPP' + str(layout['vpp']) if layout.get('vpp') else ''} EP{layout.get('ep')} "
                 f"ETP{layout.get('etp')} CP{layout.get('cp')} DP{layout.get('dp')}")
    opt = meta.get("optimizer")
    groups = {"model": [], "optimizer": []}
    for key, info in reader.info.items():
        groups["optimizer" if key.startswith("optimizer.") else "model"].append(info)
    lines = [f"{step_dir}: k2mcore checkpoint (megatron torch_dist), step {meta['step']}, "
             f"{meta['consumed_samples']} samples consumed",
             f"  model: {meta.get('model')}: {_model_line(model)}",
             f"  saved: {saved}",
             f"  optimizer state: {opt['name'] + ' (' + opt['sharding'] + ')' if opt else 'none (weights only)'}"]
    for kind, infos in groups.items():
        if infos:
            dtypes = Counter(str(i.dtype).replace("torch.", "") for i in infos)
            lines.append(f"  {kind} tensors: {len(infos)}, {_size(sum(i.nbytes for i in infos))}, "
                         f"dtypes {dict(dtypes)}")
    if src:
        lines.append(f"  from: {src.get('hf_dir')} ({src.get('model_type')}); carries its "
                     f"{', '.join(sorted(lineage.hf_files())) or 'no files'}")
    dropped = src.get("dropped")
    if dropped:
        lines.append(f"  dropped: MTP layers {dropped['mtp_layers']} ({dropped['tensors']} tensors, "
                     f"{_size(dropped['bytes'])}) by {dropped['by']}")
    lines.append("  FP8: no (weights stored in " + ", ".join(sorted({str(i.dtype).replace('torch.', '') for i in groups['model']})) + ")")
    return "\n".join(lines)


def _describe_hf(path: str) -> str:
    from k2mcore.hf.fp8 import block_size
    from k2mcore.hf.mapping import TensorSource, model_config_from_hf, read_hf_config

    hf = read_hf_config(path)
    try:
        model = model_config_from_hf(hf, source=os.path.join(path, "config.json"))
        model_line = _model_line(model)
    except ValueError as exc:
        model_line = f"(not convertible: {exc})"
    source = TensorSource(path)
    dtypes: Counter = Counter()
    total = 0
    for name in source.where:
        shape, dtype = source.shape_dtype(name)
        dtypes[str(dtype).replace("torch.", "")] += 1
        total += math.prod(shape) * dtype.itemsize
    fp8 = f"yes, {block_size(hf)[0]}x{block_size(hf)[1]} blocks (weight_scale_inv)" if source.fp8 else "no"
    lines = [
        f"{path}: Hugging Face safetensors ({len(set(source.where.values()))} files), "
        f"model_type {hf.get('model_type')}",
        f"  model: {model_line}",
        "  saved: Hugging Face layout (one full tensor per name)",
        f"  tensors: {len(source.where)}, {_size(total)}, dtypes {dict(dtypes)}",
        f"  FP8: {fp8}",
    ]
    layers = hf.get("num_hidden_layers")
    mtp = sorted({int(m[1]) for m in map(_LAYER.match, source.where) if m and isinstance(layers, int)
                  and int(m[1]) >= layers})
    if mtp:
        lines.append(f"  MTP layers: {', '.join(f'model.layers.{i}' for i in mtp)} (hf-to-mcore refuses "
                     "them; --drop-mtp converts the rest)")
    return "\n".join(lines)


_LAYER = re.compile(r"model\.layers\.(\d+)\.")
