"""MLA self-attention on the local spec with context parallelism and blockwise attention.

megatron's MLASelfAttention up-projects K and V for its tokens and hands full q/k/v to the core
attention; its local core attention refuses context parallelism, and Transformer-Engine's ring
would pass the up-projected K/V between ranks. Here, when the sequence is split over CP or is
longer than one attention block (`model.attention_block_size`), the layer instead:

1. computes its queries as megatron does (rope at the tokens' global positions: megatron's rotary
   table is sliced per CP rank);
2. norms its tokens' compressed KV latent and rotates their rope key, and all-gathers both over
   sequence parallelism then CP (k2mcore.parallel.context.gather_tokens; the backward
   reduce-scatters the latent's gradient);
3. attends block by block from the latent (k2mcore.model.blockwise), up-projecting one key
   block's K and V at a time with `linear_kv_up_proj`'s weight, and recomputing them in the
   backward.

Packed sequences (THD) at CP > 1 take the same path per document (k2mcore.parallel.context:
each document padded to a multiple of 2·cp, two chunks of it per rank). Otherwise (short
sequences, packed ones at CP 1, inference) it is megatron's forward unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from k2mcore.compat.mla import K2MLASelfAttention
from k2mcore.config.schema import ModelConfig
from k2mcore.parallel.context import gather_tokens, packed_query_chunks, query_chunks

from .blockwise import blockwise_latent_attention

#: model.attention_block_size's default (the schema's): K/V of 1,024 tokens at a time, at K2's
#: shapes 64 heads x 320 values in bf16, 42 MB, and fp32 logits tiles of 64 x 1,024 x 1,024
DEFAULT_BLOCK = ModelConfig.attention_block_size


def _packed_bounds(params) -> Optional[list[int]]:
    """The packed documents' padded boundaries over the whole sequence (megatron's
    `cu_seqlens_q_padded`, else `cu_seqlens_q`), or None unpacked."""
    if params is None:
        return None
    if params.qkv_format != "thd":
        raise ValueError(f"packed_seq_params.qkv_format: {params.qkv_format!r}; k2mcore's MLA "
                         f"takes 'thd'")
    cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None \
        else params.cu_seqlens_q
    return [int(x) for x in cu.tolist()]


class LatentMLASelfAttention(K2MLASelfAttention):
    """K2MLASelfAttention (the spec's norms, TP-replicated down projections) whose long or
    context-parallel sequences attend blockwise from the all-gathered latent."""

    def __init__(self, config, submodules, *args, attention_block_size: int = DEFAULT_BLOCK,
                 **kwargs) -> None:
        super().__init__(config, submodules, *args, **kwargs)
        # (checked by the config, and by blockwise_latent_attention when used)
        self.attention_block_size = attention_block_size
        self.cp_group = self.pg_collection.cp

    def _tokens(self, hidden_states: torch.Tensor) -> int:
        """Tokens of the whole sequence (hidden_states is this rank's [s / (tp if SP) / cp])."""
        sp = self.config.sequence_parallel and self.tp_group.size() > 1
        return hidden_states.shape[0] * (self.tp_group.size() if sp else 1) * self.cp_group.size()

    def uses_blockwise(self, hidden_states: torch.Tensor, packed_seq_params=None,
                       inference_context=None) -> bool:
        cp = self.cp_group.size()
        if inference_context is not None:
            if cp > 1:
                raise ValueError("k2mcore's local MLA does not run inference with context "
                                 "parallelism")
            return False
        if packed_seq_params is not None:  # at CP 1: megatron's forward, document by document
            return cp > 1
        return cp > 1 or self._tokens(hidden_states) > self.attention_block_size

    def forward(self, hidden_states, attention_mask, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, rotary_pos_cos=None,
                rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                packed_seq_params=None, position_ids=None, sequence_len_offset=None, *,
                inference_params=None):
        if not self.uses_blockwise(hidden_states, packed_seq_params,
                                   inference_context or inference_params):
            return super().forward(
                hidden_states, attention_mask, key_value_states, inference_context,
                rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
                attention_bias, packed_seq_params, position_ids, sequence_len_offset,
                inference_params=inference_params)
        if self.training and self.core_attention.dropout_p > 0:
            raise ValueError("attention dropout is not supported by blockwise MLA attention")
        bounds = _packed_bounds(packed_seq_params)
        query, latent, k_rope = self._query_and_latent(hidden_states, bounds)
        probe: Optional[list] = [] if self.core_attention.measure_max_logit else None
        s, cp, rank = query.shape[0], self.cp_group.size(), self.cp_group.rank()
        chunks = (query_chunks(s, cp, rank) if bounds is None
                  else packed_query_chunks(bounds, cp, rank))
        out = blockwise_latent_attention(
            query.permute(1, 2, 0, 3),  # [s, b, n, d] -> [b, n, s, d]
            latent.transpose(0, 1), k_rope.transpose(0, 1),
            self.linear_kv_up_proj.weight, chunks,
            v_head_dim=self.config.v_head_dim, softmax_scale=self.softmax_scale,
            block_size=self.attention_block_size, probe=probe)
        if probe:
            self.core_attention.record_max_logit(probe[0])
        core_attn_out = out.permute(2, 0, 1, 3).reshape(s, out.shape[0], -1)  # [s, b, n * dv]
        return self.linear_proj(core_attn_out)

    def _query_and_latent(self, hidden_states: torch.Tensor,
                          bounds: Optional[list[int]] = None):
        """(query [s, b, n, qk + rope] roped, latent [S, b, r] normed, k_rope [S, b, rope]
        roped): this rank's queries, and every token's latent and rope key in sequence order.
        Packed (`bounds`: the documents' padded boundaries, b = 1): rope restarts at every
        document, and a rank holds two chunks of each."""
        cfg = self.config
        if getattr(self.linear_kv_up_proj, "bias", None) is not None:
            raise ValueError("blockwise MLA attention: linear_kv_up_proj has a bias")
        packed = bounds is not None
        # this rank's rows of the rotary table (megatron slices it by CP rank), or for packed
        # documents the table up to the longest, which megatron's THD rope slices per document
        rotary_len = (max(b - a for a, b in zip(bounds[:-1], bounds[1:])) if packed
                      else self._tokens(hidden_states))
        if cfg.rope_type == "rope":
            rotary, mscale = self.rotary_pos_emb(rotary_len, packed_seq=packed), 1.0
        else:
            rotary, mscale = self.rotary_pos_emb(rotary_len, packed_seq=packed)
        q_compressed, kv_combined = self._qkv_down_projection(hidden_states)
        kv_compressed, k_rope = torch.split(
            kv_combined, [cfg.kv_lora_rank, cfg.qk_pos_emb_head_dim], dim=-1)
        if cfg.q_lora_rank is not None:
            q_compressed = self.q_layernorm(q_compressed)
            q, _ = self.linear_q_up_proj(q_compressed)
        else:
            q, _ = self.linear_q_proj(q_compressed)
        q = q.view(*q.shape[:-1], self.num_attention_heads_per_partition, self.q_head_dim)
        latent = self.kv_layernorm(kv_compressed)
        if self.tp_group.size() > 1:
            if cfg.sequence_parallel:  # [s / tp] -> [s]; the backward reduce-scatters
                latent = gather_from_sequence_parallel_region(latent, group=self.tp_group)
                k_rope = gather_from_sequence_parallel_region(k_rope, group=self.tp_group)
            else:  # replicated; each TP rank's heads add to the gradient
                latent = copy_to_tensor_model_parallel_region(latent, group=self.tp_group)
                k_rope = copy_to_tensor_model_parallel_region(k_rope, group=self.tp_group)
        q_nope, q_pos = torch.split(q, [cfg.qk_head_dim, cfg.qk_pos_emb_head_dim], dim=-1)
        if packed:  # THD rope on [t, heads, d], per document at its chunks' positions
            cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
            rope = lambda t: apply_rotary_pos_emb(  # noqa: E731
                t.squeeze(1), rotary, config=cfg, cu_seqlens=cu, mscale=mscale,
                cp_group=self.cp_group, mla_rotary_interleaved=True).unsqueeze(1)
        else:
            rotary = rotary[:q.shape[0]]
            rope = lambda t: apply_rotary_pos_emb(  # noqa: E731
                t, rotary, config=cfg, mscale=mscale, cp_group=self.cp_group,
                mla_rotary_interleaved=True)
        q_pos = rope(q_pos)
        k_rope = rope(k_rope.unsqueeze(-2)).squeeze(-2)
        query = torch.cat([q_nope, q_pos], dim=-1)
        # one gather of both over CP: [s, b, r + rope] -> [S, b, r + rope], in sequence order
        every = gather_tokens(torch.cat([latent, k_rope], dim=-1), self.cp_group, bounds)
        latent, k_rope = torch.split(every, [cfg.kv_lora_rank, cfg.qk_pos_emb_head_dim], dim=-1)
        return query, latent, k_rope
