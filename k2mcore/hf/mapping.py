"""Hugging Face DeepseekV3 / Kimi-K2 <-> k2mcore: config fields and weight names.

Weight names map one-to-one except the gated MLPs, whose megatron `linear_fc1` is
cat(gate_proj, up_proj) along the output dim (see shared/reference/kimi-k2.md).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, Mapping

import torch

from k2mcore.config.schema import ModelConfig, RopeScalingConfig
from k2mcore.hf.safetensors_io import SafetensorsError, SafetensorsFile

HF_MODEL_TYPES = ("deepseek_v3", "kimi_k2")

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
_ROUTER = [
    ("mlp.router.weight", "mlp.gate.weight"),
    ("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias"),
]


class HFFormatError(ValueError):
    """A Hugging Face directory k2mcore cannot read; the message names the file or tensor."""


def read_hf_config(path: str) -> dict[str, Any]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise HFFormatError(f"{path}: no config.json (not a Hugging Face model directory)")
    with open(cfg_path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise HFFormatError(f"{cfg_path}: not valid JSON ({e})") from None


def model_config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF DeepseekV3/Kimi-K2 config dict (transformers 4 or 5 layout)."""
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise HFFormatError(
            f"{source}: model_type {model_type!r} is not one of {', '.join(HF_MODEL_TYPES)}"
        )
    # transformers 5 folds rope_theta/rope_scaling into rope_parameters
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "yarn":
        scaling = RopeScalingConfig(
            factor=float(rope["factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            beta_fast=float(rope.get("beta_fast", 32.0)),
            beta_slow=float(rope.get("beta_slow", 1.0)),
            mscale=float(rope.get("mscale", 1.0)),
            mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)),
        )
    elif rope_type != "default":
        raise HFFormatError(f"{source}: rope type {rope_type!r} is not supported (default, yarn)")
    n_group, topk_group = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
    topk = int(hf["num_experts_per_tok"])
    if n_group > 1 and topk // topk_group != 2:
        # HF scores a group by its top-2 experts, megatron by its top-(topk // topk_group).
        raise HFFormatError(
            f"{source}: n_group={n_group} with num_experts_per_tok={topk}, topk_group="
            f"{topk_group} routes differently in megatron (needs topk // topk_group == 2)"
        )
    return ModelConfig(
        name=hf.get("_name_or_path") or model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=int(hf["num_attention_heads"]),
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=int(hf["kv_lora_rank"]),
        qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
        qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
        v_head_dim=int(hf["v_head_dim"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
        num_experts=int(hf["n_routed_experts"]),
        num_shared_experts=int(hf.get("n_shared_experts") or 0),
        moe_topk=topk,
        first_k_dense=int(hf.get("first_k_dense_replace", 0)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        rope_interleave=bool(hf.get("rope_interleave", True)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.006)),
    )


def _rope_deinterleave(w: torch.Tensor, heads: int, head_dim: int, rope_dim: int) -> torch.Tensor:
    """HF rope_interleave=False rows -> megatron's order: new[2j] = old[j], new[2j+1] = old[j+d/2].

    `w` holds `heads` blocks of `head_dim` rows whose last `rope_dim` rows are rope rows.
    """
    w = w.reshape(heads, head_dim, -1).clone()
    rope = w[:, head_dim - rope_dim :]
    half = rope_dim // 2
    w[:, head_dim - rope_dim :] = torch.stack([rope[:, :half], rope[:, half:]], 2).flatten(1, 2)
    return w.flatten(0, 1)


def _walk(model: ModelConfig) -> Iterator[tuple[str, str, bool]]:
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


def hf_to_mcore(
    get: "TensorSource", model: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megatron name, tensor) for a 1-rank GPTModel, reading HF tensors one at a time."""
    for mc, hf, gated in _walk(model):
        if gated:
            yield from _gated(get, hf, mc)
            continue
        t = get(hf)
        yield mc, (t if model.rope_interleave else _maybe_deinterleave(mc, t, model))


def mcore_to_hf(get: Callable[[str], torch.Tensor], model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) from a getter of 1-rank megatron tensors: hf_to_mcore's inverse."""
    for mc, hf, gated in _walk(model):
        if gated:
            yield from _ungated(get, mc, hf)
            continue
        t = get(mc)
        yield hf, (t if model.rope_interleave else _maybe_deinterleave(mc, t, model, inverse=True))


def _ungated(get: Callable[[str], torch.Tensor], mc: str, hf: str) -> Iterator[tuple[str, torch.Tensor]]:
    gate, up = get(mc + "linear_fc1.weight").chunk(2, dim=0)
    yield hf + "gate_proj.weight", gate
    yield hf + "up_proj.weight", up
    yield hf + "down_proj.weight", get(mc + "linear_fc2.weight")


def hf_config_from_model(model: ModelConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    """A config.json for transformers' DeepseekV3ForCausalLM (model_config_from_hf's inverse)."""
    rope = model.rope_scaling
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size, "moe_intermediate_size": model.moe_ffn_hidden_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_attention_heads, "n_shared_experts": model.num_shared_experts,
        "n_routed_experts": model.num_experts, "num_experts_per_tok": model.moe_topk,
        "routed_scaling_factor": model.routed_scaling_factor, "kv_lora_rank": model.kv_lora_rank,
        "q_lora_rank": model.q_lora_rank, "qk_rope_head_dim": model.qk_rope_head_dim,
        "qk_nope_head_dim": model.qk_nope_head_dim, "v_head_dim": model.v_head_dim,
        "n_group": model.n_group, "topk_group": model.topk_group,
        "first_k_dense_replace": model.first_k_dense, "norm_topk_prob": model.norm_topk_prob,
        "hidden_act": "silu", "max_position_embeddings": model.max_position_embeddings,
        "initializer_range": model.init_std, "rms_norm_eps": model.rms_norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": None if rope is None else {
            "type": "yarn", "rope_type": "yarn", "factor": rope.factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
            "beta_fast": rope.beta_fast, "beta_slow": rope.beta_slow, "mscale": rope.mscale,
            "mscale_all_dim": rope.mscale_all_dim},
        "rope_interleave": model.rope_interleave, "tie_word_embeddings": model.tie_word_embeddings,
        "attention_bias": False, "attention_dropout": 0.0, "use_cache": True,
        "torch_dtype": dtype, "bos_token_id": 0, "eos_token_id": 1,
    }


def _gated(get: "TensorSource", hf: str, mc: str) -> Iterator[tuple[str, torch.Tensor]]:
    gate, up = get(hf + "gate_proj.weight"), get(hf + "up_proj.weight")
    yield mc + "linear_fc1.weight", torch.cat([gate, up], dim=0)
    yield mc + "linear_fc2.weight", get(hf + "down_proj.weight")


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
        """Headers only are kept (tensors are read one by one, no mapping of the file)."""
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
        from k2mcore.hf.fp8 import SCALE_SUFFIX, FP8FormatError, dequantize

        t = self._raw(name)
        if name + SCALE_SUFFIX in self.where:
            try:
                return dequantize(t, self._raw(name + SCALE_SUFFIX), block=self.block, name=name)
            except FP8FormatError as exc:
                raise HFFormatError(f"{self.path}: {exc}") from None
        if t.dtype == torch.float8_e4m3fn:
            raise HFFormatError(f"{self.path}: {name} is FP8 but has no {name}{SCALE_SUFFIX}")
        return t

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """A stored tensor's shape and dtype, from its file's header (nothing read)."""
        return self._file(self.where[name]).shape_dtype(name)

    def close(self) -> None:
        self._files.clear()
