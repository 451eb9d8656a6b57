"""Parameter counts of a K2Config, analytic: the unsharded shapes megatron builds for MLA + MoE
with the local (non-TE) spec, the model's totals, and what one rank of each pipeline stage holds
under a Layout. No torch or megatron imports (`k2m-train --check` prints them)."""
from __future__ import annotations

from k2mcore.config.schema import K2Config, ModelConfig

from .layout import Layout


def megatron_param_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Unsharded parameter shapes of megatron's GPTModel (MLA + MoE, local spec with
    qk_layernorm=True, SequentialMLP experts, no biases), global layer numbering, in the order
    of the built model's named_parameters (the planner lays DDP buffers out from it). The router's
    expert_bias is a buffer, not a parameter, so it is not listed."""
    h, heads = m.hidden_size, m.num_attention_heads
    q_head = m.qk_nope_head_dim + m.qk_rope_head_dim
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (m.vocab_size, h)}
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        a = p + "self_attention."
        shapes[p + "input_layernorm.weight"] = (h,)
        # MLASelfAttention's construction order (what named_parameters yields, and so the
        # order of the DDP buffers): linear_proj first (the Attention base class), norms last
        shapes[a + "linear_proj.weight"] = (h, heads * m.v_head_dim)
        if m.q_lora_rank is None:
            shapes[a + "linear_q_proj.weight"] = (heads * q_head, h)
        else:
            shapes[a + "linear_q_down_proj.weight"] = (m.q_lora_rank, h)
            shapes[a + "linear_q_up_proj.weight"] = (heads * q_head, m.q_lora_rank)
        shapes[a + "linear_kv_down_proj.weight"] = (m.kv_lora_rank + m.qk_rope_head_dim, h)
        shapes[a + "linear_kv_up_proj.weight"] = (
            heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
        if m.q_lora_rank is not None:
            shapes[a + "q_layernorm.weight"] = (m.q_lora_rank,)
        shapes[a + "kv_layernorm.weight"] = (m.kv_lora_rank,)
        shapes[p + "pre_mlp_layernorm.weight"] = (h,)
        if i < m.first_k_dense:
            shapes[p + "mlp.linear_fc1.weight"] = (2 * m.ffn_hidden_size, h)  # gate and up
            shapes[p + "mlp.linear_fc2.weight"] = (h, m.ffn_hidden_size)
            continue
        shapes[p + "mlp.router.weight"] = (m.num_experts, h)
        for e in range(m.num_experts):
            x = f"{p}mlp.experts.local_experts.{e}."
            shapes[x + "linear_fc1.weight"] = (2 * m.moe_ffn_hidden_size, h)
            shapes[x + "linear_fc2.weight"] = (h, m.moe_ffn_hidden_size)
        if m.num_shared_experts:
            shared = m.num_shared_experts * m.moe_ffn_hidden_size
            shapes[p + "mlp.shared_experts.linear_fc1.weight"] = (2 * shared, h)
            shapes[p + "mlp.shared_experts.linear_fc2.weight"] = (h, shared)
    shapes["decoder.final_layernorm.weight"] = (h,)
    if not m.tie_word_embeddings:
        shapes["output_layer.weight"] = (m.vocab_size, h)
    return shapes


def _attention_parts(m: ModelConfig) -> dict[str, int]:
    """Per-layer attention parameters by module; replicated ones marked by the `norm` key."""
    h, heads = m.hidden_size, m.num_attention_heads
    q_head = m.qk_nope_head_dim + m.qk_rope_head_dim
    parts = {
        "kv_down": h * (m.kv_lora_rank + m.qk_rope_head_dim),
        "kv_up": m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim),
        "proj": heads * m.v_head_dim * h,
        "norm": h + m.kv_lora_rank,  # input_layernorm, kv_layernorm
    }
    if m.q_lora_rank is None:
        parts["q_up"] = h * heads * q_head  # plain linear_q_proj, column parallel
    else:
        parts["q_down"] = h * m.q_lora_rank
        parts["q_up"] = m.q_lora_rank * heads * q_head
        parts["norm"] += m.q_lora_rank
    return parts


def count_parameters(m: ModelConfig) -> dict[str, int]:
    """Analytic parameter counts of the unsharded model (matches `megatron_param_shapes`).

    `active` counts what one token touches (all non-expert weights incl. embedding and output layer,
    plus top-k routed experts), the convention of DeepSeek-V3's 37B; `active_non_embedding` drops
    embedding and output layer (Moonlight's 2.24B convention).
    """
    h = m.hidden_size
    attention = sum(_attention_parts(m).values())
    dense_mlp = 3 * m.ffn_hidden_size * h
    expert = 3 * m.moe_ffn_hidden_size * h
    router = m.num_experts * h
    shared = m.num_shared_experts * expert
    routed = m.num_experts * expert
    num_dense = min(m.first_k_dense, m.num_layers)
    num_moe = m.num_layers - num_dense
    dense_layer = attention + h + dense_mlp  # + pre_mlp_layernorm
    moe_layer = attention + h + router + shared + routed
    embedding = m.vocab_size * h
    output = 0 if m.tie_word_embeddings else m.vocab_size * h
    total = embedding + num_dense * dense_layer + num_moe * moe_layer + h + output
    active = total - num_moe * (m.num_experts - m.moe_topk) * expert
    return {
        "embedding": embedding,
        "attention_per_layer": attention,
        "dense_mlp_per_layer": dense_mlp,
        "dense_layer": dense_layer,
        "moe_router_per_layer": router,
        "moe_shared_experts_per_layer": shared,
        "moe_routed_experts_per_layer": routed,
        "routed_expert": expert,
        "moe_layer": moe_layer,
        "num_dense_layers": num_dense,
        "num_moe_layers": num_moe,
        "final_norm": h,
        "output_layer": output,
        "total": total,
        "active": active,
        "active_non_embedding": active - embedding - output,
    }


def _layer_params_on_rank(m: ModelConfig, layout: Layout, moe: bool) -> int:
    """What one (tp, ep) rank holds of one decoder layer. Norms, the router and the q/kv
    down-projections are replicated (TE's duplicated linear, k2mcore's ReplicatedLinear on the
    local spec); TP splits the other linears, EP x ETP the routed experts."""
    h, tp = m.hidden_size, layout.tp
    parts = _attention_parts(m)
    n = parts.pop("norm") + h  # + pre_mlp_layernorm
    for name, value in parts.items():
        n += value if name in ("q_down", "kv_down") else value // tp
    if not moe:
        return n + 3 * m.ffn_hidden_size * h // tp
    expert = 3 * m.moe_ffn_hidden_size * h
    n += m.num_experts * h + m.num_shared_experts * expert // tp
    return n + (m.num_experts // layout.ep) * expert // layout.etp


def stage_parameters(cfg: K2Config, layout: Layout) -> list[int]:
    """Parameters held by one rank of each pipeline stage (all virtual chunks of that rank)."""
    m, h = cfg.model, cfg.model.hidden_size
    vocab_shard = m.vocab_size * h // layout.tp
    out = []
    for r in range(layout.pp):
        n = 0
        for v, text in enumerate(layout.stages[r]):
            for i in layout.layer_ids(r, v):
                n += _layer_params_on_rank(m, layout, i >= m.first_k_dense)
            if "E" in text:
                n += vocab_shard
            if "L" in text:
                n += h  # final_layernorm
                # a tied output layer is a second copy unless the embedding is in this chunk too
                if not m.tie_word_embeddings or "E" not in text:
                    n += vocab_shard
        out.append(n)
    return out


def params_per_rank(cfg: K2Config, layout: Layout) -> tuple[int, int]:
    """(min, max) over pipeline stages of the parameters one rank holds."""
    counts = stage_parameters(cfg, layout)
    return min(counts), max(counts)
