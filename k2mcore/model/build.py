"""Build this rank's K2 model chunks (one per virtual pipeline stage) on megatron's GPTModel."""
from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import MLATransformerConfig

from k2mcore import platform
from k2mcore.config.schema import K2Config, ModelConfig
from k2mcore.config.validate import recompute_modules
from k2mcore.parallel.groups import ProcessGroups

from .config import mla_config, resolve_dtype
from .init import layout_invariant_init
from .spec import k2_block_spec


def build_gpt_chunk(
    model: ModelConfig,
    config: MLATransformerConfig,
    *,
    use_te: bool,
    pre_process: bool,
    post_process: bool,
    vp_stage: Optional[int] = None,
    max_seq_length: Optional[int] = None,
) -> GPTModel:
    """One chunk; `pre_process`/`post_process`: it holds the embedding / the loss."""
    return GPTModel(
        config=config,
        transformer_layer_spec=k2_block_spec(
            config, use_te=use_te, vp_stage=vp_stage,
            measure_max_logit=model.measure_max_attn_logit,
            attention_block_size=model.attention_block_size,
        ),
        vocab_size=model.vocab_size,
        max_sequence_length=max_seq_length or model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",  # MLA applies its own (decoupled) rope inside attention
        vp_stage=vp_stage,
    )


def build_model(
    cfg: K2Config, groups: ProcessGroups, *, use_te: Optional[bool] = None,
    initialize: bool = True,
) -> list[GPTModel]:
    """This rank's model chunks, one per virtual stage of its place in `groups.layout`.

    `initialize=False` skips the layout-invariant init (for weights loaded right after).
    """
    use_te = platform.te_usable() if use_te is None else use_te
    model_cfg = cfg.model
    if cfg.qk_clip_active and not model_cfg.measure_max_attn_logit:
        model_cfg = dataclasses.replace(model_cfg, measure_max_attn_logit=True)
    config = mla_config(
        model_cfg, cfg.parallel, dtype=resolve_dtype(cfg.train.dtype), use_te=use_te,
        recompute=cfg.train.recompute, recompute_modules=recompute_modules(cfg),
    )
    vpp = groups.layout.vpp
    chunks = [
        build_gpt_chunk(model_cfg, config, use_te=use_te, vp_stage=vp,
                        pre_process=groups.holds("E", vp or 0),
                        post_process=groups.holds("L", vp or 0),
                        max_seq_length=cfg.train.seq_length)
        for vp in (range(vpp) if vpp else [None])
    ]
    if initialize and cfg.train.init == "layout_invariant":
        layout_invariant_init(chunks, cfg.model, cfg.train.seed)
    device = platform.device()
    return [chunk.to(device) for chunk in chunks]
