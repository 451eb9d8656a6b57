"""Every 1-rank megatron tensor of a K2 model with its shape, from the config alone, and the
torch_dist key each is stored under (routed experts stacked as [experts, ...], as megatron's
expert layers save them), so a converter can check and place tensors without building a model."""
from __future__ import annotations

import re
from typing import Optional

from k2mcore.config.schema import ModelConfig

_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.(.+)$")


def expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, heads = m.hidden_size, m.num_attention_heads
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    out: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (m.vocab_size, h)}
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,),
            p + "pre_mlp_layernorm.weight": (h,),
            p + "self_attention.linear_kv_down_proj.weight": (m.kv_lora_rank + m.qk_rope_head_dim, h),
            p + "self_attention.kv_layernorm.weight": (m.kv_lora_rank,),
            p + "self_attention.linear_kv_up_proj.weight":
                (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
            p + "self_attention.linear_proj.weight": (h, heads * m.v_head_dim),
        })
        if m.q_lora_rank:
            out.update({
                p + "self_attention.linear_q_down_proj.weight": (m.q_lora_rank, h),
                p + "self_attention.q_layernorm.weight": (m.q_lora_rank,),
                p + "self_attention.linear_q_up_proj.weight": (heads * qk, m.q_lora_rank),
            })
        else:
            out[p + "self_attention.linear_q_proj.weight"] = (heads * qk, h)
        if i < m.first_k_dense:
            out[p + "mlp.linear_fc1.weight"] = (2 * m.ffn_hidden_size, h)
            out[p + "mlp.linear_fc2.weight"] = (h, m.ffn_hidden_size)
            continue
        out[p + "mlp.router.weight"] = (m.num_experts, h)
        out[p + "mlp.router.expert_bias"] = (m.num_experts,)
        for e in range(m.num_experts):
            out[f"{p}mlp.experts.local_experts.{e}.linear_fc1.weight"] = (2 * m.moe_ffn_hidden_size, h)
            out[f"{p}mlp.experts.local_experts.{e}.linear_fc2.weight"] = (h, m.moe_ffn_hidden_size)
        if m.num_shared_experts:
            shared = m.moe_ffn_hidden_size * m.num_shared_experts
            out[p + "mlp.shared_experts.linear_fc1.weight"] = (2 * shared, h)
            out[p + "mlp.shared_experts.linear_fc2.weight"] = (h, shared)
    out["decoder.final_layernorm.weight"] = (h,)
    if not m.tie_word_embeddings:
        out["output_layer.weight"] = (m.vocab_size, h)
    return out


def dcp_key(name: str, shape: tuple[int, ...], m: ModelConfig) -> tuple[str, tuple[int, ...], tuple[int, ...], Optional[int]]:
    """(key, global shape, chunk offsets, expert index or None) of a 1-rank megatron tensor.

    A routed expert's tensor is chunk [e] of the stacked key; the caller adds the leading dim.
    """
    match = _EXPERT.match(name)
    if match is None:
        return name, shape, (0,) * len(shape), None
    prefix, e, rest = match.groups()
    return f"{prefix}experts.{rest}", (m.num_experts, *shape), (int(e),) + (0,) * len(shape), int(e)


def split_expert_name(name: str) -> Optional[tuple[str, int]]:
    """(stacked key, expert index) for a routed expert's 1-rank name, else None."""
    match = _EXPERT.match(name)
    if match is None:
        return None
    prefix, e, rest = match.groups()
    return f"{prefix}experts.{rest}", int(e)
