"""A TP-replicated linear for MLA's down projections on the local spec."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from k2mcore import platform


class ReplicatedLinear(torch.nn.Module):
    """Full weight on every TP rank ("duplicated", as TE's spec builds MLA's down projections).

    megatron's local spec makes them ColumnParallelLinear and gathers the output, but the
    gather's backward only splits the gradient: the shared rotary key's gradient then misses
    the other TP ranks' heads. Replicated, MLA takes its sequence-parallel path instead (the
    rotary key is gathered over SP, whose backward reduce-scatters), and the weight, which then
    sees a different sequence shard per rank, is marked `sequence_parallel` so megatron
    all-reduces its gradient over TP.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        init_method: Callable[[torch.Tensor], None],
        bias: bool = False,
        **_unused,
    ) -> None:
        super().__init__()
        if bias:
            raise ValueError("ReplicatedLinear has no bias (MLA's down projections have none)")
        device = platform.device()
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype, device=device)
        )
        if config.perform_initialization:
            init_method(self.weight)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return F.linear(x, self.weight), None
