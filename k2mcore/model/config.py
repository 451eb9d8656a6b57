"""k2mcore's ModelConfig/ParallelConfig -> megatron-core's MLATransformerConfig.

Every field that decides numerics is set explicitly: megatron's MLA defaults (YaRN with factor 40,
beta_fast 32, mscale_all_dim 0, softmax router, aux loss) are DeepSeek-V2's, not K2's.
See docs/reference.md, 'Hugging Face parity', for what each one breaks when left out.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import MLATransformerConfig

from k2mcore import platform
from k2mcore.config.schema import ModelConfig, ParallelConfig
from k2mcore.parallel.layout import megatron_sizes


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' is bf16 on GPU and fp32 on CPU (bf16 matmul is ~40x slower on this CPU)."""
    if name == "auto":
        return platform.default_dtype()
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def mla_config(
    model: ModelConfig,
    parallel: Optional[ParallelConfig] = None,
    *,
    dtype: torch.dtype = torch.float32,
    use_te: bool = False,
    recompute: str = "none",
    recompute_modules: Optional[list[str]] = None,
) -> MLATransformerConfig:
    parallel = (parallel or ParallelConfig()).resolve()
    if not model.norm_topk_prob:
        raise ValueError("model.norm_topk_prob=false: megatron's sigmoid router always normalizes")
    dense = model.first_k_dense
    rope = model.rope_scaling
    kw = dict(
        # shape
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        q_lora_rank=model.q_lora_rank,
        kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_nope_head_dim,
        qk_pos_emb_head_dim=model.qk_rope_head_dim,
        v_head_dim=model.v_head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        qk_layernorm=True,  # else the local spec makes the q/kv latent norms identities
        activation_func=F.silu,
        gated_linear_unit=True,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        # rope: without scaling, factor 1 too (MLA applies yarn's mscale whatever rope_type)
        rotary_base=model.rope_theta,
        rope_type="yarn" if rope else "rope",
        rotary_scaling_factor=rope.factor if rope else 1.0,
        original_max_position_embeddings=(
            rope.original_max_position_embeddings if rope else model.max_position_embeddings
        ),
        beta_fast=rope.beta_fast if rope else 32.0,
        beta_slow=rope.beta_slow if rope else 1.0,
        mscale=rope.mscale if rope else 1.0,
        mscale_all_dim=rope.mscale_all_dim if rope else 0.0,
        apply_rope_fusion=False,
        # MoE: sigmoid router, aux-loss-free expert bias, scaled top-k, grouped top-k
        num_moe_experts=model.num_experts,
        moe_layer_freq=[0] * dense + [1] * (model.num_layers - dense),
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=(
            model.num_shared_experts * model.moe_ffn_hidden_size
            if model.num_shared_experts
            else None
        ),
        moe_router_topk=model.moe_topk,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=model.moe_router_bias_update_rate,
        moe_router_topk_scaling_factor=model.routed_scaling_factor,
        moe_router_num_groups=model.n_group if model.n_group > 1 else None,
        moe_router_group_topk=model.topk_group if model.n_group > 1 else None,
        moe_router_load_balancing_type="seq_aux_loss" if model.moe_aux_loss_coeff else "none",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=use_te,
        # TE's core attention records the per-head max logit (`current_max_attn_logits`, the
        # attribute k2mcore's own core attention fills) only when asked
        log_max_attention_logit=use_te and model.measure_max_attn_logit,
        # parallelism
        **megatron_sizes(parallel),
        sequence_parallel=parallel.sp,
        # precision; the fusions need CUDA kernels
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        cuda_graph_modules=[],  # no CUDA graphs; its default "full" is deprecated in 0.19
        # the loss is the mean over the unmasked tokens of the whole global batch (the schedule
        # sums token losses, finalize_model_grads divides the gradients by the global count),
        # not a mean of micro-batch means: with chat data's uneven assistant-token counts, the
        # update then does not depend on the micro-batch split or the DP degree
        calculate_per_token_loss=True,
    )
    if parallel.pipeline_layout:
        kw["pipeline_model_parallel_layout"] = parallel.pipeline_layout
    else:
        kw["virtual_pipeline_model_parallel_size"] = parallel.vpp
        kw["num_layers_in_first_pipeline_stage"] = parallel.first_stage_layers
        kw["num_layers_in_last_pipeline_stage"] = parallel.last_stage_layers
    if recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        # K2's selective set: norms, MLA up-projections, SwiGLU, MoE. megatron recomputes just
        # the experts' activation only with grouped GEMM (TE); otherwise the whole MoE layer.
        # train.recompute_modules replaces the set (megatron's --recompute-modules).
        kw.update(
            recompute_granularity="selective",
            recompute_modules=list(recompute_modules) if recompute_modules else
            ["layernorm", "mla_up_proj", "mlp", "moe_act" if use_te else "moe"],
        )
    return MLATransformerConfig(**kw)
