"""Every 1-rank megatron tensor of a K2 model with its shape, from the config alone, and the
torch_dist key each is stored under (routed experts stacked as [experts, ...], as megatron's
expert layers save them), so a converter can check and place tensors without building a model."""
from __future__ import annotations

import re
from typing import Optional

from k2mcore.config.schema import ModelConfig

_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.(.+)$")


def expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """megatron's parameters (k2mcore.parallel.layout's table) plus the routers' expert_bias
    buffers, which checkpoints carry as well."""
    from k2mcore.parallel.param_counts import megatron_param_shapes

    out = megatron_param_shapes(m)
    for i in range(m.first_k_dense, m.num_layers):
        out[f"decoder.layers.{i}.mlp.router.expert_bias"] = (m.num_experts,)
    return out


def dcp_key(name: str, shape: tuple[int, ...], m: ModelConfig) -> tuple[str, tuple[int, ...], tuple[int, ...], Optional[int]]:
    """(key, global shape, chunk offsets, expert index or None) of a 1-rank megatron tensor.

    A routed expert's tensor is chunk [e] of the stacked key; the caller adds the leading dim.
    """
    match = _EXPERT.match(name)
    if match is None:
        return name, shape, (0,) * len(shape), None
    prefix, e, rest = match.groups()
    return f"{prefix}experts.{rest}", (m.num_experts, *shape), (int(e),) + (0,) * len(shape), int(e)


def split_expert_name(name: str) -> Optional[tuple[str, int]]:
    """(stacked key, expert index) for a routed expert's 1-rank name, else None."""
    match = _EXPERT.match(name)
    if match is None:
        return None
    prefix, e, rest = match.groups()
    return f"{prefix}experts.{rest}", int(e)
