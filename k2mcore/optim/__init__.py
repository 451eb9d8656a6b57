"""Optimizers: MuonClip (Muon + QK-Clip) pieces for single-process and distributed use."""
from .muon import MuonClip, apply_muon_update, muon_update, rms_match_scale
from .newton_schulz import K2_COEFFS, NS_COEFFICIENTS, newton_schulz, ns_flops, resolve_coefficients
from .param_groups import ParamSplit, split_params
from .qk_clip import QKClipStats, clip_qk_in_model, mla_attentions, mla_clip_row_scales, qk_clip_, scale_rows_

__all__ = [
    "K2_COEFFS", "NS_COEFFICIENTS", "MuonClip", "ParamSplit", "QKClipStats", "apply_muon_update",
    "clip_qk_in_model", "mla_attentions", "mla_clip_row_scales", "muon_update", "newton_schulz",
    "ns_flops", "qk_clip_", "resolve_coefficients", "rms_match_scale", "scale_rows_", "split_params",
]
