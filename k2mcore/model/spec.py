"""Layer specs for the K2 transformer.

On a GPU with Transformer-Engine the block spec is megatron-core's own TE spec. Otherwise the
local spec is composed from megatron-core's local layers through a spec provider that swaps in
the two modules megatron lacks there: an MLA-capable core attention and an SP-capable RMSNorm;
its MLA is k2mcore's (k2mcore.model.mla: context parallelism, blockwise attention).
"""
from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_mlp_module_spec_for_backend,
)
from megatron.core.transformer.enums import AttnMaskType, LayerType
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from k2mcore.compat.mla import with_spec_norms

from .attention import MLACoreAttention
from .mla import DEFAULT_BLOCK, LatentMLASelfAttention
from .norm import LatentRMSNorm, RMSNorm


class K2LocalSpecProvider(LocalSpecProvider):
    """megatron's local layers, with k2mcore's norm and MLA core attention."""

    def __init__(self, measure_max_logit: bool = False,
                 attention_block_size: int = DEFAULT_BLOCK) -> None:
        self.measure_max_logit = measure_max_logit
        self.attention_block_size = attention_block_size

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False,
                   has_residual: bool = False) -> type:
        return LatentRMSNorm if for_qk else RMSNorm

    def core_attention(self) -> ModuleSpec:  # type: ignore[override]
        return ModuleSpec(
            module=MLACoreAttention, params={"measure_max_logit": self.measure_max_logit}
        )


def k2_layer_spec(backend: K2LocalSpecProvider, moe: bool) -> ModuleSpec:
    """One MLA transformer layer with a dense MLP or an MoE (sequential local experts)."""
    norm = backend.layer_norm(rms_norm=True)
    mlp = get_mlp_module_spec_for_backend(backend=backend, num_experts=1 if moe else None)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=LatentMLASelfAttention,
                params={"attn_mask_type": AttnMaskType.causal,
                        "attention_block_size": backend.attention_block_size},
                submodules=MLASelfAttentionSubmodules(
                    linear_q_proj=backend.column_parallel_linear(),
                    linear_q_down_proj=backend.column_parallel_linear(),
                    linear_q_up_proj=backend.column_parallel_linear(),
                    linear_kv_down_proj=backend.column_parallel_linear(),
                    linear_kv_up_proj=backend.column_parallel_linear(),
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=backend.layer_norm(rms_norm=True, for_qk=True),
                    kv_layernorm=backend.layer_norm(rms_norm=True, for_qk=True),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def k2_block_spec(
    config: TransformerConfig,
    *,
    use_te: bool,
    vp_stage: Optional[int] = None,
    measure_max_logit: bool = False,
    attention_block_size: int = DEFAULT_BLOCK,
) -> TransformerBlockSubmodules:
    """The layers of this pipeline rank's (virtual) stage, dense first, then MoE."""
    if use_te:
        block = get_gpt_decoder_block_spec(
            config, use_transformer_engine=True, normalization="RMSNorm", vp_stage=vp_stage
        )
        block.layer_specs = [with_spec_norms(spec) for spec in block.layer_specs]
        return block
    backend = K2LocalSpecProvider(measure_max_logit, attention_block_size)
    dense, moe = k2_layer_spec(backend, moe=False), k2_layer_spec(backend, moe=True)
    specs = [moe if is_moe else dense for is_moe in config.moe_layer_freq]
    layout = config.pipeline_model_parallel_layout
    if layout is not None:
        ids = layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage)
        local = [specs[i] for i in ids]
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        local = specs[offset : offset + get_num_layers_to_build(config, vp_stage=vp_stage)]
    return TransformerBlockSubmodules(layer_specs=local, layer_norm=RMSNorm)
