"""Hugging Face DeepseekV3 / Kimi-K2 `config.json` <-> k2mcore's ModelConfig.

Three directions, one table (`_FIELDS`):
- `model_config_from_hf`: a release's config (transformers 4 or 5 layout) -> ModelConfig;
- `updated_hf_config`: a converted model's export keeps its source config.json and changes only
  the fields whose ModelConfig value training changed (in the source's own schema), plus what the
  export itself changes (dtype, no quantization_config, dropped MTP layers), as Megatron-Bridge's
  export keeps the source config;
- `fresh_hf_config`: a model trained from scratch gets the config transformers' own
  `DeepseekV3Config.save_pretrained` writes (its `use_diff` form: transformers 5's schema, with
  `rope_parameters` and `dtype`), with bos/eos/pad ids from the tokenizer. Tested field by field
  against transformers, which k2mcore does not need at run time.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import fields
from typing import Any, Callable, Mapping, Optional

from k2mcore.config.schema import ModelConfig, RopeScalingConfig
from k2mcore.errors import HFFormatError

HF_MODEL_TYPES = ("deepseek_v3", "kimi_k2")
HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}


def _opt_int(v: Any) -> Optional[int]:
    return None if v is None else int(v)


# (ModelConfig field, HF key, cast, HF default when the key is absent or null); rope_theta and
# rope_scaling have their own code (two schemas)
_FIELDS: tuple[tuple[str, str, Callable, Any], ...] = (
    ("vocab_size", "vocab_size", int, None),
    ("hidden_size", "hidden_size", int, None),
    ("num_layers", "num_hidden_layers", int, None),
    ("num_attention_heads", "num_attention_heads", int, None),
    ("q_lora_rank", "q_lora_rank", _opt_int, None),
    ("kv_lora_rank", "kv_lora_rank", int, None),
    ("qk_nope_head_dim", "qk_nope_head_dim", int, None),
    ("qk_rope_head_dim", "qk_rope_head_dim", int, None),
    ("v_head_dim", "v_head_dim", int, None),
    ("ffn_hidden_size", "intermediate_size", int, None),
    ("moe_ffn_hidden_size", "moe_intermediate_size", int, None),
    ("num_experts", "n_routed_experts", int, None),
    ("num_shared_experts", "n_shared_experts", int, 0),
    ("moe_topk", "num_experts_per_tok", int, None),
    ("first_k_dense", "first_k_dense_replace", int, 0),
    ("routed_scaling_factor", "routed_scaling_factor", float, 1.0),
    ("n_group", "n_group", int, 1),
    ("topk_group", "topk_group", int, 1),
    ("norm_topk_prob", "norm_topk_prob", bool, True),
    ("rms_norm_eps", "rms_norm_eps", float, 1e-6),
    ("max_position_embeddings", "max_position_embeddings", int, 4096),
    ("rope_interleave", "rope_interleave", bool, True),
    ("tie_word_embeddings", "tie_word_embeddings", bool, False),
    ("init_std", "initializer_range", float, 0.006),
)
# HF keys derived from ModelConfig fields: rewritten (where the source has them) when those change
_DERIVED: dict[str, Callable[[ModelConfig], Any]] = {
    "num_key_value_heads": lambda m: m.num_attention_heads,
    "qk_head_dim": lambda m: m.qk_nope_head_dim + m.qk_rope_head_dim,
    "head_dim": lambda m: m.qk_rope_head_dim,
}
_DERIVED_FROM = {"num_key_value_heads": ("num_attention_heads",),
                 "qk_head_dim": ("qk_nope_head_dim", "qk_rope_head_dim"),
                 "head_dim": ("qk_rope_head_dim",)}
_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim")


def read_hf_config(path: str) -> dict[str, Any]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise HFFormatError(f"{path}: no config.json (not a Hugging Face model directory)")
    with open(cfg_path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise HFFormatError(f"{cfg_path}: not valid JSON ({e})") from None


def mtp_layers(hf: Mapping[str, Any]) -> int:
    """The config's multi-token-prediction layers (DeepSeek-V3: 1; transformers' default 1)."""
    return int(hf.get("num_nextn_predict_layers") or 0)


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
    kw: dict[str, Any] = {}
    for field, key, cast, default in _FIELDS:
        value = hf.get(key)
        if value is None:
            if default is None and cast is not _opt_int:
                raise HFFormatError(f"{source}: {key} is missing")
            value = default
        kw[field] = None if value is None else cast(value)
    n_group, topk_group, topk = kw["n_group"], kw["topk_group"], kw["moe_topk"]
    if n_group > 1 and topk // topk_group != 2:
        # HF scores a group by its top-2 experts, megatron by its top-(topk // topk_group).
        raise HFFormatError(
            f"{source}: n_group={n_group} with num_experts_per_tok={topk}, topk_group="
            f"{topk_group} routes differently in megatron (needs topk // topk_group == 2)"
        )
    return ModelConfig(name=hf.get("_name_or_path") or model_type, rope_theta=float(theta),
                       rope_scaling=scaling, **kw)


def _rope_parameters(model: ModelConfig) -> dict[str, Any]:
    """transformers 5's rope_parameters (sorted keys, as it writes them)."""
    rope: dict[str, Any] = {"rope_theta": model.rope_theta, "rope_type": "default"}
    if model.rope_scaling is not None:
        rope.update({k: getattr(model.rope_scaling, k) for k in _YARN_KEYS}, rope_type="yarn")
    return dict(sorted(rope.items()))


def fresh_hf_config(model: ModelConfig, dtype: str = "bfloat16", *, bos: Optional[int] = None,
                    eos: Optional[int] = None, pad: Optional[int] = None) -> dict[str, Any]:
    """What transformers' DeepseekV3ForCausalLM.save_pretrained writes for this model."""
    out: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": bos, "dtype": dtype, "eos_token_id": eos,
        "hidden_act": "silu", "model_type": "deepseek_v3", "num_nextn_predict_layers": 0,
        "output_router_logits": False, "pad_token_id": pad, "pretraining_tp": 1,
        "rope_parameters": _rope_parameters(model), "use_cache": True,
    }
    out.update({key: getattr(model, field) for field, key, _, _ in _FIELDS})
    out.update({key: fn(model) for key, fn in _DERIVED.items()})
    return dict(sorted(out.items()))


def updated_hf_config(source: Mapping[str, Any], model: ModelConfig, dtype: str, *,
                      mtp_dropped: bool = False) -> tuple[dict[str, Any], list[str]]:
    """(the source config with only what changed rewritten, the changed keys).

    `model` is what the checkpoint holds now; fields it shares with the model the source config
    describes are left exactly as the source wrote them (types, key order, schema).
    `mtp_dropped`: the source's MTP weights were left out (`--drop-mtp`), so the export has none.
    """
    base = model_config_from_hf(source)
    out = copy.deepcopy(dict(source))
    changed: list[str] = []

    def put(key: str, value: Any) -> None:
        if out.get(key, object()) != value:
            out[key] = value
            changed.append(key)

    differs = {f.name for f in fields(ModelConfig) if getattr(base, f.name) != getattr(model, f.name)}
    for field, key, _, _ in _FIELDS:
        if field in differs:
            put(key, getattr(model, field))
    for key, deps in _DERIVED_FROM.items():
        if key in out and differs.intersection(deps):
            put(key, _DERIVED[key](model))
    if differs & {"rope_theta", "rope_scaling"}:
        if "rope_parameters" in out:
            put("rope_parameters", _rope_parameters(model))
        else:
            put("rope_theta", model.rope_theta)
            old = out.get("rope_scaling") or {}
            put("rope_scaling", None if model.rope_scaling is None else {
                **{k: v for k, v in old.items() if k in ("type", "rope_type")},
                **({} if old else {"type": "yarn", "rope_type": "yarn"}),
                **{k: getattr(model.rope_scaling, k) for k in _YARN_KEYS}})
    dtype_key = "dtype" if "dtype" in out else "torch_dtype"
    put(dtype_key, dtype)
    if "quantization_config" in out:  # the export is never quantized (FP8 releases dequantized)
        del out["quantization_config"]
        changed.append("quantization_config")
    if mtp_dropped:
        put("num_nextn_predict_layers", 0)
    return out, changed
