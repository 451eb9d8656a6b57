"""Optimizers: MuonClip (Muon + QK-Clip) pieces for single-process and distributed use.

The names below load on first use (PEP 562): the pure-python planners in this package
(shard_plan, ns_offload) are imported by `k2m-plan` and `k2m-train --check`, which must not pay
for torch and megatron."""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "MuonClip": "muon", "apply_muon_update": "muon", "muon_update": "muon",
    "rms_match_scale": "muon",
    "K2_COEFFS": "newton_schulz", "NS_COEFFICIENTS": "newton_schulz",
    "newton_schulz": "newton_schulz", "ns_flops": "newton_schulz",
    "resolve_coefficients": "newton_schulz",
    "ParamSplit": "param_groups", "split_params": "param_groups",
    "QKClipStats": "qk_clip", "clip_qk_in_model": "qk_clip", "mla_attentions": "qk_clip",
    "mla_clip_row_scales": "qk_clip", "qk_clip_": "qk_clip", "scale_rows_": "qk_clip",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
