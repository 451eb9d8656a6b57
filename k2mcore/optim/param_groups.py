"""Split a K2 GPTModel's parameters between Muon (hidden matrices) and AdamW (everything else).

Muon: 2-D hidden matrices -- MLA projections (q/kv down and up, linear_proj), dense MLP, routed
experts (per-expert 2-D in SequentialMLP, or 3-D [E, out, in] stacks), shared experts, and the
router weight unless `router_in_muon=False`.
AdamW: word embedding, output layer, norms (1-D), biases (1-D).
The router's expert bias (`mlp.router.expert_bias`, aux-loss-free balancing) is a buffer, not a
parameter: no optimizer touches it; megatron updates it from token counts.
Fused SwiGLU fc1 weights ([gate; up] rows) are listed in `gated_names`: pass them to MuonClip
with split_rows=2 so gate and up are orthogonalized separately as in HF's gate_proj/up_proj.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Union

from torch import nn

_ADAMW_MARKERS = ("embedding.", "output_layer.")


@dataclass
class ParamSplit:
    muon_names: list[str] = field(default_factory=list)
    muon_params: list[nn.Parameter] = field(default_factory=list)
    adamw_names: list[str] = field(default_factory=list)
    adamw_params: list[nn.Parameter] = field(default_factory=list)
    gated_names: list[str] = field(default_factory=list)  # subset of muon_names: fused SwiGLU fc1

    def muon_param_groups(self, split_gated: bool = True) -> list[dict]:
        """Param groups for MuonClip: fused SwiGLU fc1 in its own group with split_rows=2."""
        if not split_gated:
            return [{"params": list(self.muon_params)}]
        gated = set(self.gated_names)
        plain = [p for n, p in zip(self.muon_names, self.muon_params) if n not in gated]
        fused = [p for n, p in zip(self.muon_names, self.muon_params) if n in gated]
        return [g for g in ({"params": plain}, {"params": fused, "split_rows": 2}) if g["params"]]


def _is_gated_fc1(name: str, module_config) -> bool:
    return name.endswith("linear_fc1.weight") and bool(getattr(module_config, "gated_linear_unit", False))


def split_params(
    chunks: Union[nn.Module, Iterable[nn.Module]], *, router_in_muon: bool = True
) -> ParamSplit:
    """Muon/AdamW split of this rank's model chunks (names prefixed `chunk<i>.` if several).

    Parameters shared between chunks (tied embeddings) are listed once. Parameters without
    requires_grad are skipped.
    """
    chunks = [chunks] if isinstance(chunks, nn.Module) else list(chunks)
    out, seen = ParamSplit(), set()
    for i, chunk in enumerate(chunks):
        prefix = f"chunk{i}." if len(chunks) > 1 else ""
        config = getattr(chunk, "config", None)
        for name, p in chunk.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            full = prefix + name
            is_router = name.endswith("router.weight")
            to_adamw = (
                p.ndim < 2
                or name.startswith(_ADAMW_MARKERS)
                or any(f".{m}" in name for m in _ADAMW_MARKERS)
                or (is_router and not router_in_muon)
            )
            if to_adamw:
                out.adamw_names.append(full)
                out.adamw_params.append(p)
            elif p.ndim in (2, 3):
                out.muon_names.append(full)
                out.muon_params.append(p)
                if _is_gated_fc1(name, config):
                    out.gated_names.append(full)
            else:
                raise ValueError(f"no optimizer rule for parameter {full} of shape {tuple(p.shape)}")
    return out
