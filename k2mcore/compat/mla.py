"""MLA self-attention as DeepSeek-V3/K2 compute it, on megatron-core's local (non-TE) layers.

Two places where megatron-core's `MLASelfAttention` does not give those numerics on the local
spec; both are declared patches (k2mcore/compat/patching.py), fixed in this subclass:

- its q/kv down projections accept only megatron's own linear classes, which the local spec
  splits over TP and gathers; the gather's backward only splits the gradient, so the shared
  rotary key's gradient misses the other TP ranks' heads. They are swapped for
  `k2mcore.model.linear.ReplicatedLinear` after construction (TE's spec builds them duplicated).
- 0.19's q/kv norm resolver (`transformer/mla_qk_norm_config.py`) refuses a q-latent norm without
  `q_lora_rank` and, with `qk_layernorm`, puts a norm in front of `linear_q_proj` — a norm that
  Moonlight-style models (no q low-rank projection) do not have. Here the spec's modules are used
  as given: q/kv latent norms where there is a latent, a plain `linear_q_proj` otherwise (on
  the TE spec too, through `with_spec_norms`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import build_module

from k2mcore.model.linear import ReplicatedLinear

from .patching import Patch, declare

_MLA = "megatron.core.transformer.multi_latent_attention.MLASelfAttention"
DOWN_PROJ = declare(Patch(
    "mla-replicated-down-proj", f"{_MLA}.__init__",
    params=("self", "config", "submodules", "layer_number", "attn_mask_type", "cp_comm_type",
            "pg_collection", "pp_layer_offset", "name"),
    why="the local spec's ColumnParallelLinear down projections lose other TP ranks' gradient "
        "of the shared rotary key",
    remove_when="megatron's local spec has a duplicated (TP-replicated) linear for them"))
QK_NORM = declare(Patch(
    "mla-spec-qk-norms", f"{_MLA}._resolve_qk_norm_config", params=("self", "submodules"),
    why="megatron 0.19's resolver adds a norm before linear_q_proj when q_lora_rank is None",
    remove_when="the resolver can keep a spec's plain linear_q_proj with qk_layernorm on"))


class SpecNormMLASelfAttention(MLASelfAttention):
    """megatron's MLASelfAttention building the q/kv norms and projections its spec names.

    On the TE spec these are the fused norm+linear up projections where there is a latent and a
    plain `linear_q_proj` without one, which is what DeepSeek-V3, K2 and Moonlight compute."""

    def __init__(self, config, submodules, *args, **kwargs) -> None:
        QK_NORM.check()
        super().__init__(config, submodules, *args, **kwargs)

    def _resolve_qk_norm_config(self, submodules) -> dict:
        return {
            "linear_q_proj": submodules.linear_q_proj,
            "linear_q_up_proj": submodules.linear_q_up_proj,
            "linear_kv_up_proj": submodules.linear_kv_up_proj,
            "q_layernorm": submodules.q_layernorm,  # built only when there is a q latent
            "kv_layernorm": submodules.kv_layernorm,
        }


def with_spec_norms(layer_spec: Any) -> Any:
    """A megatron layer spec whose MLASelfAttention is SpecNormMLASelfAttention (TE spec)."""
    attn = getattr(layer_spec.submodules, "self_attention", None)
    if attn is None or attn.module is not MLASelfAttention:
        return layer_spec
    submodules = dataclasses.replace(
        layer_spec.submodules,
        self_attention=dataclasses.replace(attn, module=SpecNormMLASelfAttention))
    return dataclasses.replace(layer_spec, submodules=submodules)


class K2MLASelfAttention(SpecNormMLASelfAttention):
    """The local spec's MLA: the spec's own norms, and TP-replicated down projections."""

    def __init__(self, config, submodules, *args, **kwargs) -> None:
        DOWN_PROJ.check()
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

