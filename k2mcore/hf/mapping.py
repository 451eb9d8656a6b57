"""Hugging Face DeepseekV3 / Kimi-K2 <-> k2mcore: config fields and weight names.

Weight names map one-to-one except the gated MLPs, whose megatron `linear_fc1` is
cat(gate_proj, up_proj) along the output dim (see docs/reference.md, 'Weight names').
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterator, Optional

import torch

from k2mcore.config.schema import ModelConfig
from k2mcore.errors import HFFormatError, SafetensorsError
from k2mcore.hf.config import HF_MODEL_TYPES, model_config_from_hf, read_hf_config
from k2mcore.hf.safetensors_io import SafetensorsFile

__all__ = ["GATED_PARTS", "HF_MODEL_TYPES", "HFFormatError", "TensorSource", "convert_entry", "export_entry",
           "hf_names", "hf_to_mcore",
           "mcore_to_hf", "model_config_from_hf", "read_hf_config", "walk"]

# per layer: (megatron suffix, HF suffix) for the one-to-one tensors
_ATTN = [
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("self_attention.linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("self_attention.kv_layernorm.weight", "self_attn.kv_a_layernorm.weight"),
    ("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
]
_Q_LORA = [
    ("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight"),
    ("self_attention.q_layernorm.weight", "self_attn.q_a_layernorm.weight"),
    ("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight"),
]
_Q_PLAIN = [("self_attention.linear_q_proj.weight", "self_attn.q_proj.weight")]
# a gated MLP's megatron tensors from the HF ones, concatenated along dim 0 (gate first)
GATED_PARTS = {"linear_fc1.weight": ("gate_proj.weight", "up_proj.weight"),
               "linear_fc2.weight": ("down_proj.weight",)}
_ROUTER = [
    ("mlp.router.weight", "mlp.gate.weight"),
    ("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias"),
]


def _rope_deinterleave(w: torch.Tensor, heads: int, head_dim: int, rope_dim: int) -> torch.Tensor:
    """HF rope_interleave=False rows -> megatron's order: new[2j] = old[j], new[2j+1] = old[j+d/2].

    `w` holds `heads` blocks of `head_dim` rows whose last `rope_dim` rows are rope rows.
    """
    w = w.reshape(heads, head_dim, -1).clone()
    rope = w[:, head_dim - rope_dim :]
    half = rope_dim // 2
    w[:, head_dim - rope_dim :] = torch.stack([rope[:, :half], rope[:, half:]], 2).flatten(1, 2)
    return w.flatten(0, 1)


def walk(model: ModelConfig) -> Iterator[tuple[str, str, bool]]:
    """(megatron name, HF name, False) for one-to-one tensors and (megatron prefix, HF prefix,
    True) for gated MLPs, in checkpoint order: the one mapping both directions follow."""
    yield "embedding.word_embeddings.weight", "model.embed_tokens.weight", False
    for i in range(model.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        pairs = _ATTN + (_Q_LORA if model.q_lora_rank else _Q_PLAIN)
        moe = i >= model.first_k_dense
        for m_name, h_name in pairs + (_ROUTER if moe else []):
            yield mc + m_name, hf + h_name, False
        if not moe:
            yield mc + "mlp.", hf + "mlp.", True
            continue
        for e in range(model.num_experts):
            yield f"{mc}mlp.experts.local_experts.{e}.", f"{hf}mlp.experts.{e}.", True
        if model.num_shared_experts:
            yield mc + "mlp.shared_experts.", hf + "mlp.shared_experts.", True
    yield "decoder.final_layernorm.weight", "model.norm.weight", False
    if not model.tie_word_embeddings:
        yield "output_layer.weight", "lm_head.weight", False


def hf_names(model: ModelConfig) -> set[str]:
    """Every HF tensor name the model reads (FP8 scales aside)."""
    out = set()
    for _, hf, gated in walk(model):
        out.update([hf + p + "_proj.weight" for p in ("gate", "up", "down")] if gated else [hf])
    return out


def hf_to_mcore(
    get: "TensorSource", model: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megatron name, tensor) for a 1-rank GPTModel, reading HF tensors one at a time."""
    for mc, hf, gated in walk(model):
        yield from convert_entry(get, model, mc, hf, gated)


def convert_entry(get: "TensorSource", model: ModelConfig, mc: str, hf: str,
                  gated: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The megatron tensors of one `walk` entry."""
    if gated:
        yield from _gated(get, hf, mc)
        return
    t = get(hf)
    yield mc, (t if model.rope_interleave else _maybe_deinterleave(mc, t, model))


def mcore_to_hf(get: Callable[[str], torch.Tensor], model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) from a getter of 1-rank megatron tensors: hf_to_mcore's inverse."""
    for mc, hf, gated in walk(model):
        yield from export_entry(get, model, mc, hf, gated)


def export_entry(get: Callable[[str], torch.Tensor], model: ModelConfig, mc: str, hf: str,
                 gated: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of one `walk` entry."""
    if gated:
        yield from _ungated(get, mc, hf)
        return
    t = get(mc)
    yield hf, (t if model.rope_interleave else _maybe_deinterleave(mc, t, model, inverse=True))


def _ungated(get: Callable[[str], torch.Tensor], mc: str, hf: str) -> Iterator[tuple[str, torch.Tensor]]:
    gate, up = get(mc + "linear_fc1.weight").chunk(2, dim=0)
    yield hf + "gate_proj.weight", gate
    yield hf + "up_proj.weight", up
    yield hf + "down_proj.weight", get(mc + "linear_fc2.weight")


def _gated(get: "TensorSource", hf: str, mc: str) -> Iterator[tuple[str, torch.Tensor]]:
    for m_name, parts in GATED_PARTS.items():
        ts = [get(hf + p) for p in parts]
        yield mc + m_name, ts[0] if len(ts) == 1 else torch.cat(ts, dim=0)


def _rope_interleave(w: torch.Tensor, heads: int, head_dim: int, rope_dim: int) -> torch.Tensor:
    """_rope_deinterleave's inverse: old[j] = new[2j], old[j + d/2] = new[2j+1]."""
    w = w.reshape(heads, head_dim, -1).clone()
    rope = w[:, head_dim - rope_dim :]
    w[:, head_dim - rope_dim :] = torch.cat([rope[:, 0::2], rope[:, 1::2]], 1)
    return w.flatten(0, 1)


def _maybe_deinterleave(name: str, t: torch.Tensor, m: ModelConfig, inverse: bool = False) -> torch.Tensor:
    permute = _rope_interleave if inverse else _rope_deinterleave
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    if name.endswith(("linear_q_up_proj.weight", "linear_q_proj.weight")):
        return permute(t, m.num_attention_heads, qk, m.qk_rope_head_dim)
    if name.endswith("linear_kv_down_proj.weight"):
        return permute(t, 1, m.kv_lora_rank + m.qk_rope_head_dim, m.qk_rope_head_dim)
    return t


class TensorSource:
    """Reads named tensors lazily from an HF directory's safetensors shards.

    Block-FP8 weights (a `<name>_scale_inv` beside them) come back dequantized to fp32
    (k2mcore.hf.fp8), with `block` the checkpoint's weight_block_size.
    """

    def __init__(self, path: str, block: tuple[int, int] = (128, 128)) -> None:
        self.path, self.block = path, block
        self.bytes_read = 0
        self._files: dict[str, SafetensorsFile] = {}
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                self.where = dict(json.load(f)["weight_map"])
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise HFFormatError(f"{path}: no *.safetensors files")
            self.where = {k: fname for fname in files for k in self._file(fname).keys()}
        for fname in sorted(set(self.where.values())):
            if not os.path.isfile(os.path.join(path, fname)):
                raise HFFormatError(f"{os.path.join(path, fname)}: shard named in the index is missing")
        self.fp8 = any(k.endswith("weight_scale_inv") for k in self.where)

    def _file(self, fname: str) -> SafetensorsFile:
        """Headers and a descriptor are kept (tensors are read one by one, no mapping)."""
        if fname not in self._files:
            try:
                self._files[fname] = SafetensorsFile(os.path.join(self.path, fname))
            except SafetensorsError as exc:
                raise HFFormatError(str(exc)) from None
        return self._files[fname]

    def _raw(self, name: str) -> torch.Tensor:
        fname = self.where.get(name)
        if fname is None:
            raise HFFormatError(f"{self.path}: tensor {name} is missing")
        try:
            t = self._file(fname).read(name)
        except SafetensorsError as exc:
            raise HFFormatError(str(exc)) from None
        self.bytes_read += t.numel() * t.element_size()
        return t

    def __call__(self, name: str) -> torch.Tensor:
        from k2mcore.errors import FP8FormatError
        from k2mcore.hf.fp8 import SCALE_SUFFIX, dequantize

        t = self._raw(name)
        if name + SCALE_SUFFIX in self.where:
            try:
                return dequantize(t, self._raw(name + SCALE_SUFFIX), block=self.block, name=name)
            except FP8FormatError as exc:
                raise HFFormatError(f"{self.path}: {exc}") from None
        if t.dtype == torch.float8_e4m3fn:
            raise HFFormatError(f"{self.path}: {name} is FP8 but has no {name}{SCALE_SUFFIX}")
        return t

    def locate(self, name: str) -> Optional[tuple[int, int, int, torch.dtype, tuple[int, ...]]]:
        """(descriptor, offset, bytes, dtype, shape) of a tensor stored as it is read (not
        block-FP8), for a converter that copies its bytes without reading them into a tensor;
        None for an FP8 one."""
        fname = self.where.get(name)
        if fname is None:
            raise HFFormatError(f"{self.path}: tensor {name} is missing")
        if name + "_scale_inv" in self.where:
            return None
        f = self._file(fname)
        try:
            shape, dtype = f.shape_dtype(name)
            fd, offset, nbytes = f.locate(name)
        except (SafetensorsError, KeyError) as exc:
            raise HFFormatError(str(exc)) from None
        self.bytes_read += nbytes
        return fd, offset, nbytes, dtype, shape

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """A stored tensor's shape and dtype, from its file's header (nothing read)."""
        return self._file(self.where[name]).shape_dtype(name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
