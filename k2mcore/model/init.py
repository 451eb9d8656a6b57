"""Weight initialization that does not depend on the parallel layout.

megatron initializes each rank's shard from that rank's RNG stream, so the same seed gives
different weights at TP2 than at 1 rank (and PP/EP reorder what each generator draws). Here
every tensor — one per (sharded key, layer/expert index) — is drawn whole from a generator
seeded by the run seed and its name, and each rank keeps its slice, found through megatron's
sharding metadata. Any layout then starts from the same model as 1 rank: the property that
lets a layout be checked against a 1-rank run, and a run move between layouts.

The distributions are megatron's: N(0, init_std) for matrices and embeddings, scaled by
1/sqrt(2 * num_layers) for the two residual-output projections; norms stay at one.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import torch

from k2mcore.config.schema import ModelConfig

_RESIDUAL_OUTPUTS = ("linear_proj.weight", "linear_fc2.weight")


def _std(key: str, model: ModelConfig) -> float:
    if key.endswith(_RESIDUAL_OUTPUTS):
        return model.init_std / math.sqrt(2.0 * model.num_layers)
    return model.init_std


def layout_invariant_init(chunks: Sequence[torch.nn.Module], model: ModelConfig, seed: int):
    """Overwrite this rank's matrices and embeddings with their layout-independent values."""
    from k2mcore.parallel.reshard import _index, _param_shards

    with torch.no_grad():
        for sh in _param_shards(chunks, swap=None):
            if sh.data.dim() < 2:
                continue  # norm weights: ones in every layout already
            pre = sh.prepend_axis_num
            name = f"{sh.key}/{'/'.join(map(str, sh.global_offset[:pre]))}"
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.empty(sh.global_shape[pre:]).normal_(0.0, _std(sh.key, model),
                                                              generator=gen)
            sh.data.copy_(full[_index(sh)[pre:]].to(sh.data.dtype))
