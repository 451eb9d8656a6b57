"""Optimizers: megatron's optimizer built from the config (AdamW, or MuonClip from `muonclip/`),
the Muon/AdamW parameter split, the skip-step wrapper and the optimizer-state adapter that
checkpoints save and load.

The names below load on first use (PEP 562): the pure-python planners of `muonclip/`
(shard_plan, ns_offload) are imported by `k2m-plan` and `k2m-train --check`, which must not pay
for torch and megatron."""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "MuonClip": "muonclip.muon", "apply_muon_update": "muonclip.muon",
    "muon_update": "muonclip.muon", "rms_match_scale": "muonclip.muon",
    "K2_COEFFS": "muonclip.newton_schulz", "NS_COEFFICIENTS": "muonclip.newton_schulz",
    "newton_schulz": "muonclip.newton_schulz", "ns_flops": "muonclip.newton_schulz",
    "resolve_coefficients": "muonclip.newton_schulz",
    "ParamSplit": "param_groups", "split_params": "param_groups",
    "QKClipStats": "muonclip.qk_clip", "clip_qk_in_model": "muonclip.qk_clip",
    "mla_attentions": "muonclip.qk_clip", "mla_clip_row_scales": "muonclip.qk_clip",
    "qk_clip_": "muonclip.qk_clip", "scale_rows_": "muonclip.qk_clip",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
