"""What a built trainer allocates for model state on this rank: parameters, DDP buffers and
optimizer state, counted as unique storages (the planner's k2mcore.plan.state is checked against
it). Used by layout_worker.py after an optimizer step (torch's Adam makes its state lazily)."""
from __future__ import annotations

from typing import Any

import torch


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _placeholder(t: torch.Tensor) -> bool:
    """0-dim step counters and MuonClip's zero-stride second-moment stand-ins."""
    return t.dim() == 0 or (t.numel() > 1 and all(s == 0 for s in t.stride()))


def measure_state(model: list, optimizer: Any) -> dict:
    """{params, param_bytes, grad_bytes, optimizer_bytes} of this rank."""
    from k2mcore.optim.chain import inner_optimizers

    params = [p for chunk in model for p in chunk.module.parameters()]
    param_st = dict(_storage(p) for p in params)
    grad_st = dict(_storage(p.main_grad) for p in params if getattr(p, "main_grad", None) is not None)
    opt_st: dict = {}
    for inner in inner_optimizers(optimizer):
        tensors = [p for g in inner.param_groups for p in g["params"]]
        tensors += [v for state in inner.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor)]
        for t in tensors:
            if _placeholder(t):
                continue
            ptr, n = _storage(t)
            if ptr not in param_st and ptr not in grad_st:
                opt_st[ptr] = n
    return {"params": sum(p.numel() for p in params), "param_bytes": sum(param_st.values()),
            "grad_bytes": sum(grad_st.values()), "optimizer_bytes": sum(opt_st.values())}
