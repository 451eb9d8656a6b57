"""MLA self-attention whose down projections are TP-replicated (see linear.ReplicatedLinear)."""
from __future__ import annotations

from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import build_module

from .linear import ReplicatedLinear


class K2MLASelfAttention(MLASelfAttention):
    """megatron's MLASelfAttention, with q/kv down projections replaced after construction.

    megatron only accepts its own linear classes in those two slots (TE's duplicated linear on
    the TE spec), so the parent builds ColumnParallelLinears and this class swaps them.
    """

    def __init__(self, config, submodules, *args, **kwargs) -> None:
        super().__init__(config, submodules, *args, **kwargs)
        if config.q_lora_rank is not None:
            self.linear_q_down_proj = build_module(
                ReplicatedLinear, config.hidden_size, config.q_lora_rank,
                config=config, init_method=config.init_method,
            )
        self.linear_kv_down_proj = build_module(
            ReplicatedLinear, config.hidden_size, config.kv_lora_rank + config.qk_pos_emb_head_dim,
            config=config, init_method=config.init_method,
        )
