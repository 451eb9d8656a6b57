"""Core attention for MLA on the local (non-TE) spec, with a per-head max-logit probe for QK-Clip.

megatron-core's local `DotProductAttention` assumes one head dim for q, k and v; MLA has
q/k head dim (nope + rope) != v head dim, and megatron measures the max attention logit only
inside Transformer-Engine. This module does both, and takes packed sequences (megatron's
`PackedSeqParams`, THD) as TE does: block-diagonal causal attention within each document.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class MLACoreAttention(MegatronModule):
    """softmax(q k^T * scale + causal mask) v over [s, b, heads, dim] tensors, or over the
    documents of a packed [t, heads, dim] batch (`packed_seq_params`, qkv_format "thd").

    `current_max_attn_logits` (shape [local heads], fp32) is the running max of the pre-softmax
    logits (softmax scale included) since the last reset, when built with `measure_max_logit`;
    the QK-Clip step reads and resets it (megatron's MLA `clip_qk` uses the same attribute).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        measure_max_logit: bool = False,
    ) -> None:
        super().__init__(config=config)
        # context parallelism never reaches it: k2mcore.model.mla attends blockwise from the
        # gathered latent instead, and reports its max logit through record_max_logit
        self.attn_mask_type = attn_mask_type
        k_channels = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else k_channels**-0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.measure_max_logit = measure_max_logit
        self.current_max_attn_logits: Optional[torch.Tensor] = None

    def forward(
        self,
        query: torch.Tensor,  # [sq, b, n, dqk]; packed: [t, n, dqk]
        key: torch.Tensor,  # [sk, b, n, dqk]; packed: [t, n, dqk]
        value: torch.Tensor,  # [sk, b, n, dv]; packed: [t, n, dv] (MLA pads dv to dqk there)
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias=None,
        packed_seq_params=None,
        **_unused,
    ) -> torch.Tensor:
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        if packed_seq_params is not None:
            return self._forward_packed(query, key, value, packed_seq_params, causal)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        keep = None
        if attention_mask is not None and not causal:
            keep = ~attention_mask.bool()
        out = self._attend(q, k, v, causal, keep)
        # [b, n, s, dv] -> [s, b, n * dv]
        return out.permute(2, 0, 1, 3).reshape(q.shape[2], out.shape[0], -1)

    def _forward_packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        params, causal: bool) -> torch.Tensor:
        """THD: documents laid end to end along t, `params.cu_seqlens_q` their boundaries (as
        TE reads megatron's PackedSeqParams); each attends only within itself. -> [t, n * dv]"""
        if params.qkv_format != "thd":
            raise ValueError(f"packed_seq_params.qkv_format: {params.qkv_format!r}; the local "
                             f"MLA core attention takes 'thd'")
        if params.cu_seqlens_q_padded is not None or params.cu_seqlens_kv_padded is not None:
            raise ValueError("packed_seq_params.cu_seqlens_q_padded: padding inside documents "
                             "is not supported by the local MLA core attention")
        bounds = params.cu_seqlens_q.tolist()
        if params.cu_seqlens_kv is not None and params.cu_seqlens_kv.tolist() != bounds:
            raise ValueError("packed_seq_params.cu_seqlens_kv differs from cu_seqlens_q "
                             "(self-attention)")
        if bounds[0] != 0 or bounds[-1] != query.shape[0]:
            raise ValueError(f"packed_seq_params.cu_seqlens_q: {bounds[0]}..{bounds[-1]} does "
                             f"not cover the {query.shape[0]} packed tokens")
        # One document at a time, each exactly the unpacked computation: sum of L_i^2 scores,
        # not t^2, and no mask across documents to get wrong.
        parts = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                q, k, v = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
                parts.append(self._attend(q, k, v, causal, None)[0].transpose(0, 1))
        return torch.cat(parts).reshape(query.shape[0], -1)  # [t, n, dv] -> [t, n * dv]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                keep: Optional[torch.Tensor]) -> torch.Tensor:
        """[b, n, sq, d] tensors -> [b, n, sq, dv]; `keep`: True where attention is allowed
        (megatron's masks are True where masked), used when not causal."""
        sq, sk = q.shape[2], k.shape[2]
        if causal:
            keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        if self.measure_max_logit:
            # One explicit QK^T feeds both the softmax and the probe, so measuring costs a max.
            logits = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale
            if keep is not None:
                logits = logits.masked_fill(~keep, float("-inf"))
            self._update_max_logit(logits.detach())
            probs = torch.softmax(logits.float(), dim=-1).to(v.dtype)
            if self.training and self.dropout_p > 0:
                probs = F.dropout(probs, self.dropout_p)
            return torch.matmul(probs, v)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
        )

    def _update_max_logit(self, logits: torch.Tensor) -> None:
        self.record_max_logit(logits.float().amax(dim=(0, 2, 3)))  # [b, n, sq, sk] -> [n]

    def record_max_logit(self, per_head: torch.Tensor) -> None:
        """Fold a per-head max logit ([local heads]) into the running max."""
        per_head = per_head.detach().float()
        prev = self.current_max_attn_logits
        self.current_max_attn_logits = per_head if prev is None else torch.maximum(prev, per_head)
