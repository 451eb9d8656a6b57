"""Parallel layout of a K2Config and analytic parameter counts, without torch or megatron imports.

The pipeline split mirrors megatron-core 0.19.2 (`TransformerConfig.__post_init__`,
`get_num_layers_to_build`, `get_transformer_layer_offset`, `PipelineParallelLayerLayout`), and the
parameter counts mirror the modules megatron builds for MLA + MoE with the local (non-TE) spec.
Importing megatron's layout class costs ~5 s (it pulls torch and parallel_state), which `--check`
cannot afford, so the layout-string parser is reimplemented here and tested against megatron's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from k2mcore.config.errors import ConfigError
from k2mcore.config.schema import K2Config, ModelConfig, ParallelConfig

# Megatron's layout characters: E embedding, L loss (final norm + output layer), t decoder layer,
# m MTP layer.
LAYOUT_CHARS = {"E": "embedding", "L": "loss", "t": "decoder", "m": "mtp"}


def parse_pipeline_layout(layout: str, key: str = "parallel.pipeline_layout") -> list[str]:
    """Layout string -> one string of layer characters per stage, in megatron's stage order
    (stage index = vp_stage * pp + pp_rank). Same syntax as PipelineParallelLayerLayout."""
    text = layout.replace(",", "")  # commas are cosmetic
    for pattern in (r"\(([^)]+)\)\*(\d+)", r"(.)\*(\d+)"):  # (..)*n first, then x*n
        text = re.sub(pattern, lambda m: m.group(1) * int(m.group(2)), text)
    stages = text.split("|")
    for stage in stages:
        for char in stage:
            if char not in LAYOUT_CHARS:
                raise ConfigError(
                    f"{key}: invalid layer character {char!r} in {layout!r} "
                    f"(known: {', '.join(LAYOUT_CHARS)})"
                )
    return stages


Stages = list[list[str]]  # [pp_rank][vp_stage] -> layout chars of that chunk, e.g. "Ett"


def pipeline_stages(model: ModelConfig, par: ParallelConfig) -> tuple[Stages, Optional[int]]:
    """Return ([pp_rank][vp_stage] -> stage contents like "Ett", vpp as megatron resolves it).

    vpp is None when the schedule is not interleaved. Raises ConfigError with megatron's rules.
    """
    pp, num_layers = par.pp, model.num_layers
    if par.pipeline_layout is not None:
        return _stages_from_layout(model, par)
    vpp = par.vpp
    chunks = vpp or 1
    first, last = par.first_stage_layers, par.last_stage_layers
    if first is not None or last is not None:
        counts = _uneven_counts(num_layers, pp, vpp, first, last)
    else:
        if num_layers % pp:
            raise ConfigError(
                f"model.num_layers={num_layers} is not divisible by parallel.pp={pp} "
                f"(set parallel.first_stage_layers/last_stage_layers or parallel.pipeline_layout)"
            )
        if (num_layers // pp) % chunks:
            raise ConfigError(
                f"parallel.vpp={vpp}: {num_layers // pp} layers per pipeline rank "
                f"(model.num_layers={num_layers} / parallel.pp={pp}) are not divisible by it"
            )
        counts = [num_layers // pp] * pp
    stages = [["t" * (counts[r] // chunks) for _ in range(chunks)] for r in range(pp)]
    stages[0][0] = "E" + stages[0][0]
    stages[-1][-1] += "L"
    return stages, vpp


def _uneven_counts(
    num_layers: int, pp: int, vpp: Optional[int], first: Optional[int], last: Optional[int]
) -> list[int]:
    """Layers per pipeline rank with first/last-stage counts (megatron's uneven-PP rules)."""
    middle_layers, middle_stages = num_layers, pp
    for name, value in (("first_stage_layers", first), ("last_stage_layers", last)):
        if value is None:
            continue
        if vpp is not None and value % vpp:
            raise ConfigError(f"parallel.{name}={value} is not divisible by parallel.vpp={vpp}")
        middle_layers -= value
        middle_stages -= 1
    if middle_stages < 0:
        raise ConfigError(
            f"parallel.first_stage_layers={first} and last_stage_layers={last} need "
            f"parallel.pp >= 2 (got pp={pp})"
        )
    if vpp is not None and middle_stages == 0:
        # megatron-core 0.19.2 get_transformer_layer_offset divides by the middle-stage count
        raise ConfigError(
            f"parallel.vpp={vpp} with parallel.first_stage_layers={first} and last_stage_layers="
            f"{last} at parallel.pp={pp} leaves no middle stage, which megatron cannot offset "
            f"(use parallel.pipeline_layout)"
        )
    if bool(middle_layers) != bool(middle_stages) or middle_layers < 0:
        raise ConfigError(
            f"parallel.first_stage_layers={first}, last_stage_layers={last}: leave "
            f"{middle_layers} of model.num_layers={num_layers} for {middle_stages} middle stages "
            f"(parallel.pp={pp})"
        )
    per_middle = middle_layers // middle_stages if middle_stages else 0
    if middle_stages and middle_layers % middle_stages:
        raise ConfigError(
            f"parallel.first_stage_layers={first}, last_stage_layers={last}: the remaining "
            f"{middle_layers} layers are not divisible by the {middle_stages} middle stages"
        )
    if middle_stages and vpp is not None and per_middle % vpp:
        raise ConfigError(
            f"parallel.vpp={vpp}: {per_middle} layers per middle pipeline rank are not divisible "
            f"by it"
        )
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def _stages_from_layout(model: ModelConfig, par: ParallelConfig) -> tuple[Stages, Optional[int]]:
    key, layout, pp = "parallel.pipeline_layout", par.pipeline_layout, par.pp
    if par.first_stage_layers is not None or par.last_stage_layers is not None:
        raise ConfigError(
            f"{key}={layout!r} cannot be combined with parallel.first_stage_layers="
            f"{par.first_stage_layers}/last_stage_layers={par.last_stage_layers}"
        )
    flat = parse_pipeline_layout(layout, key)
    if len(flat) % pp:
        raise ConfigError(
            f"{key}={layout!r}: {len(flat)} stages are not divisible by parallel.pp={pp}")
    detected = len(flat) // pp
    if par.vpp is not None and par.vpp != detected:
        raise ConfigError(
            f"parallel.vpp={par.vpp} conflicts with {key}={layout!r}, which gives "
            f"{len(flat)} stages / pp {pp} = {detected} virtual stages per rank"
        )
    vpp = par.vpp if par.vpp is not None else (detected if detected > 1 else None)
    order = "".join(flat)  # megatron's flatten order: vp-major, then pp rank
    problems = []
    if not order.startswith("E"):
        problems.append("must start with E (embedding)")
    if not order.endswith("L"):
        problems.append("must end with L (loss)")
    if order.count("E") != 1 or order.count("L") != 1:
        problems.append("must hold exactly one E and one L")
    if order.count("m"):
        problems.append("holds MTP layers (m), which this trainer does not build")
    if order.count("t") != model.num_layers:
        problems.append(
            f"has {order.count('t')} decoder layers (t), model.num_layers={model.num_layers}")
    if problems:
        raise ConfigError(f"{key}={layout!r}: " + "; ".join(problems))
    stages = [[flat[v * pp + r] for v in range(detected)] for r in range(pp)]
    return stages, vpp


def megatron_sizes(sizes: Any) -> dict:
    """The parallel sizes under megatron's keyword names, shared by initialize_model_parallel and
    TransformerConfig; `sizes`: a Layout or a ParallelConfig (anything with tp/pp/cp/ep/etp)."""
    return {"tensor_model_parallel_size": sizes.tp, "pipeline_model_parallel_size": sizes.pp,
            "context_parallel_size": sizes.cp, "expert_model_parallel_size": sizes.ep,
            "expert_tensor_parallel_size": sizes.etp}


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    vpp: Optional[int]  # as megatron resolves it: None = no interleaving
    ep: int
    etp: int
    cp: int
    dp: int
    expert_dp: int  # world / (etp * ep * pp): replicas of each expert shard
    sp: bool
    num_microbatches: int  # per step and data-parallel rank
    stages: list[list[str]]  # [pp_rank][vp_stage] -> megatron layout chars, e.g. "Et"
    layers: list[list[int]]  # [pp_rank][vp_stage] -> decoder layers in that chunk
    embedding_stage: tuple[int, int]  # (pp_rank, vp_stage)
    loss_stage: tuple[int, int]

    def sizes(self) -> dict:
        """The parallel sizes, as a checkpoint records the layout it was saved in."""
        return {"world_size": self.world_size, "tp": self.tp, "pp": self.pp, "vpp": self.vpp,
                "ep": self.ep, "etp": self.etp, "cp": self.cp, "dp": self.dp, "sp": self.sp}

    def layer_ids(self, pp_rank: int, vp_stage: int = 0) -> list[int]:
        """Global decoder-layer numbers held by one chunk (chunks run vp-major, then pp rank)."""
        offset = sum(self.layers[r][v] for v in range(vp_stage) for r in range(self.pp))
        offset += sum(self.layers[r][vp_stage] for r in range(pp_rank))
        return list(range(offset, offset + self.layers[pp_rank][vp_stage]))

    def describe_stages(self) -> str:
        """Compact per-rank summary, identical neighbouring ranks merged: `pp0: [E+1, 2] ...`."""

        def chunk(text: str) -> str:
            n = text.count("t")
            parts = (["E"] if "E" in text else []) + ([str(n)] if n or text == "" else [])
            return "+".join(parts + (["L"] if "L" in text else []))

        rows = [f"[{', '.join(chunk(s) for s in ranks)}]" for ranks in self.stages]
        out, start = [], 0
        for r in range(1, self.pp + 1):
            if r == self.pp or rows[r] != rows[start]:
                name = f"pp{start}" if r - 1 == start else f"pp{start}-{r - 1}"
                out.append(f"{name}: {rows[start]}")
                start = r
        return "  ".join(out)


# ---------------------------------------------------------------- parameter counts
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
