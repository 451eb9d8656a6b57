"""Build this rank's K2 model chunks (one per virtual pipeline stage) on megatron's GPTModel."""
from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import MLATransformerConfig

from k2mcore import platform
from k2mcore.config.schema import K2Config, ModelConfig

from .config import mla_config, resolve_dtype
from .init import layout_invariant_init
from .spec import k2_block_spec


def build_gpt_chunk(
    model: ModelConfig,
    config: MLATransformerConfig,
    *,
    use_te: bool,
    vp_stage: Optional[int] = None,
    max_seq_length: Optional[int] = None,
) -> GPTModel:
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=k2_block_spec(
            config, use_te=use_te, vp_stage=vp_stage,
            measure_max_logit=model.measure_max_attn_logit,
        ),
        vocab_size=model.vocab_size,
        max_sequence_length=max_seq_length or model.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",  # MLA applies its own (decoupled) rope inside attention
        vp_stage=vp_stage,
    )


def build_model(
    cfg: K2Config, *, use_te: Optional[bool] = None, initialize: bool = True
) -> list[GPTModel]:
    """This rank's model chunks; process groups must exist (k2mcore.parallel.init_distributed).

    `initialize=False` skips the layout-invariant init (for weights loaded right after).
    """
    use_te = platform.te_usable() if use_te is None else use_te
    model_cfg = cfg.model
    if cfg.qk_clip_active and not model_cfg.measure_max_attn_logit:
        model_cfg = dataclasses.replace(model_cfg, measure_max_attn_logit=True)
    config = mla_config(
        model_cfg, cfg.parallel, dtype=resolve_dtype(cfg.train.dtype), use_te=use_te,
        recompute=cfg.train.recompute,
    )
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = range(vpp) if vpp and vpp > 1 else [None]
    chunks = [
        build_gpt_chunk(model_cfg, config, use_te=use_te, vp_stage=vp,
                        max_seq_length=cfg.train.seq_length)
        for vp in stages
    ]
    if initialize and cfg.train.init == "layout_invariant":
        layout_invariant_init(chunks, cfg.model, cfg.train.seed)
    device = platform.device()
    return [chunk.to(device) for chunk in chunks]
