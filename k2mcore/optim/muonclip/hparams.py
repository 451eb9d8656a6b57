"""MuonClip's hyper-parameters: the config section (`optimizer.muon`, `k2mcore.config.schema.
MuonConfig`) is their one declaration; `MuonHyperParams` is that section resolved for the
optimizer (a coefficient name -> its numbers, a dtype name -> a torch dtype)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from k2mcore.config.schema import MuonConfig

from .newton_schulz import default_ns_dtype, resolve_coefficients

_CONFIG = MuonConfig()
_NS_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}
#: Newton-Schulz's normalisation epsilon (X0 = G / (||G|| + eps)); not a config field
NS_EPS = 1e-7


@dataclass(frozen=True)
class MuonHyperParams:
    momentum: float = _CONFIG.momentum
    nesterov: bool = _CONFIG.nesterov
    ns_steps: int = _CONFIG.ns_steps
    coefficients: tuple[float, float, float] = resolve_coefficients(_CONFIG.coefficients)
    eps: float = NS_EPS
    ns_dtype: Optional[torch.dtype] = _NS_DTYPES[_CONFIG.ns_dtype]  # None: bf16 on CUDA, fp32 on CPU
    lr_scale: float = _CONFIG.lr_scale  # Muon's lr = the param group's (scheduled) lr x lr_scale
    weight_decay: Optional[float] = _CONFIG.weight_decay  # None: the param group's weight decay

    @classmethod
    def from_config(cls, m: MuonConfig) -> "MuonHyperParams":
        return cls(momentum=m.momentum, nesterov=m.nesterov, ns_steps=m.ns_steps,
                   coefficients=resolve_coefficients(m.coefficients), eps=NS_EPS,
                   ns_dtype=_NS_DTYPES[m.ns_dtype], lr_scale=m.lr_scale,
                   weight_decay=m.weight_decay)

    def wire_dtype(self) -> torch.dtype:
        """The dtype Newton-Schulz computes in here, which the Muon exchanges carry."""
        from k2mcore import platform

        return self.ns_dtype or default_ns_dtype(platform.device())
