"""RMSNorm usable in every layout of the local (non-TE) spec."""
from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32, as HF's DeepseekV3RMSNorm.

    Its weight is marked `sequence_parallel` when SP is on: each TP rank then sees a different
    slice of the sequence, and megatron's grad finalization all-reduces marked weights over TP
    (the stock torch-norm wrapper refuses SP, and megatron refuses MoE + TP without SP).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class LatentRMSNorm(RMSNorm):
    """Norm of MLA's compressed q/kv latents. DeepSeek-V3's and K2's reference code build it with
    a fixed eps of 1e-6 whatever `rms_norm_eps` is (Moonlight's 1e-5 applies elsewhere only)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(config, hidden_size, eps=1e-6)
