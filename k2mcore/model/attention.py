"""Core attention for MLA on the local (non-TE) spec, with a per-head max-logit probe for QK-Clip.

megatron-core's local `DotProductAttention` assumes one head dim for q, k and v; MLA has
q/k head dim (nope + rope) != v head dim, and megatron measures the max attention logit only
inside Transformer-Engine. This module does both.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class MLACoreAttention(MegatronModule):
    """softmax(q k^T * scale + causal mask) v over [s, b, heads, dim] tensors.

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
        if config.context_parallel_size != 1:
            raise ValueError("MLACoreAttention (local spec) does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        k_channels = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else k_channels**-0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.measure_max_logit = measure_max_logit
        self.current_max_attn_logits: Optional[torch.Tensor] = None

    def forward(
        self,
        query: torch.Tensor,  # [sq, b, n, dqk]
        key: torch.Tensor,  # [sk, b, n, dqk]
        value: torch.Tensor,  # [sk, b, n, dv]
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias=None,
        packed_seq_params=None,
        **_unused,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need the TE attention backend")
        mask_type = attn_mask_type or self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        sq, sk = q.shape[2], k.shape[2]
        causal = mask_type == AttnMaskType.causal
        # keep: True where attention is allowed (megatron's masks are True where masked).
        keep = None
        if causal:
            keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        if attention_mask is not None and not causal:
            keep = ~attention_mask.bool()
        if self.measure_max_logit:
            # One explicit QK^T feeds both the softmax and the probe, so measuring costs a max.
            logits = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale
            if keep is not None:
                logits = logits.masked_fill(~keep, float("-inf"))
            self._update_max_logit(logits.detach())
            probs = torch.softmax(logits.float(), dim=-1).to(v.dtype)
            if self.training and self.dropout_p > 0:
                probs = F.dropout(probs, self.dropout_p)
            out = torch.matmul(probs, v)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, dropout_p=self.dropout_p if self.training else 0.0,
                scale=self.softmax_scale,
            )
        # [b, n, s, dv] -> [s, b, n * dv]
        return out.permute(2, 0, 1, 3).reshape(sq, out.shape[0], -1)

    def _update_max_logit(self, logits: torch.Tensor) -> None:
        per_head = logits.float().amax(dim=(0, 2, 3))  # [b, n, sq, sk] -> [n]
        prev = self.current_max_attn_logits
        self.current_max_attn_logits = per_head if prev is None else torch.maximum(prev, per_head)
