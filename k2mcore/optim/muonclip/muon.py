"""MuonClip's Muon part on one process: momentum, Newton-Schulz, RMS-matched update, decoupled wd.

The math lives in `muon_update` / `apply_muon_update` (pure, on full matrices) so that a
distributed optimizer can gather a full matrix, call them, and keep its shard. QK-Clip is a
separate post-step (k2mcore.optim.muonclip.qk_clip), as in the K2 report.

Per matrix W [n, m] (or per expert of a stack [E, n, m]), with mu = momentum:
    B_t = mu B_{t-1} + (1 - mu) G_t                     (EMA form, as torch.optim.Muon)
    U_t = (1 - mu) G_t + mu B_t   if nesterov else B_t
    O_t = NS(U_t) * 0.2 * sqrt(max(n, m))               (update RMS matched to AdamW)
    W_t = W_{t-1} - lr * (O_t + wd * W_{t-1})
The reference's sum form M_t = mu M_{t-1} + G_t (Nesterov input mu M_t + G_t) is the EMA form
times 1/(1 - mu); Newton-Schulz divides by the Frobenius norm first, so the updates agree (up to
eps). This is torch.optim.Muon(adjust_lr_fn="match_rms_adamw", nesterov=True).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from .hparams import MuonHyperParams
from .newton_schulz import Coefficients, newton_schulz, resolve_coefficients

_HP = MuonHyperParams()  # the defaults of optimizer.muon (k2mcore.config.schema.MuonConfig)


def rms_match_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """0.2 * sqrt(max(rows, cols)) of a matrix [rows, cols] or an expert stack [E, rows, cols]."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


def nesterov_input(grad: Tensor, momentum_buf: Tensor, *, momentum: float = _HP.momentum,
                   nesterov: bool = _HP.nesterov) -> Tensor:
    """Update momentum_buf in place (EMA) and return Newton-Schulz's input U_t.

    Element-wise, so it runs on any shard of a matrix (a ZeRO slice) with its matching buffer.
    """
    momentum_buf.lerp_(grad.to(momentum_buf.dtype), 1 - momentum)
    return grad.to(momentum_buf.dtype).lerp(momentum_buf, momentum) if nesterov else momentum_buf


def orthogonalized_update(
    u: Tensor,
    *,
    ns_steps: int = _HP.ns_steps,
    coefficients: Coefficients = _HP.coefficients,
    eps: float = _HP.eps,
    ns_dtype: Optional[torch.dtype] = _HP.ns_dtype,
    split_rows: int = 1,
) -> Tensor:
    """O_t = NS(U_t) * 0.2 sqrt(max dims), fp32, for a full matrix [n, m] or a stack [E, n, m].

    split_rows=k orthogonalizes k equal row blocks [n/k, m] on their own (a fused SwiGLU fc1
    [gate; up] as HF's separate gate_proj and up_proj), scaled by 0.2 sqrt(max(n/k, m)).
    """
    n, m = u.shape[-2:]
    if split_rows < 1 or n % split_rows:
        raise ValueError(f"split_rows={split_rows} does not divide the {n} rows of a {tuple(u.shape)} matrix")
    blocks = u.reshape(-1, n // split_rows, m) if split_rows > 1 else u
    o = newton_schulz(blocks, ns_steps, coefficients, eps, dtype=ns_dtype).float()
    return o.mul_(rms_match_scale(blocks.shape)).view(u.shape)


def muon_update(
    grad: Tensor,
    momentum_buf: Tensor,
    *,
    momentum: float = _HP.momentum,
    nesterov: bool = _HP.nesterov,
    **ns: Any,
) -> Tensor:
    """Update momentum_buf in place and return O_t (NS output x 0.2 sqrt(max dims)), fp32.

    grad/momentum_buf: a full matrix [n, m] or expert stack [E, n, m] (each expert on its own).
    `ns`: orthogonalized_update's keyword arguments (ns_steps, coefficients, eps, ns_dtype,
    split_rows).
    """
    u = nesterov_input(grad, momentum_buf, momentum=momentum, nesterov=nesterov)
    return orthogonalized_update(u, **ns)


def apply_muon_update(param: Tensor, update: Tensor, *, lr: float, weight_decay: float) -> None:
    """W <- W - lr * (O + wd * W), in place (W may be a shard with its matching update slice)."""
    param.mul_(1 - lr * weight_decay)
    param.add_(update.to(param.dtype), alpha=-lr)


class MuonClip(torch.optim.Optimizer):
    """Muon for 2-D hidden matrices and 3-D expert stacks [E, out, in], on one process.

    Give embeddings, output layer, norms and biases to AdamW (k2mcore.optim.param_groups);
    call k2mcore.optim.muonclip.qk_clip.clip_qk_in_model after each step for the "Clip" part.
    `coefficients`: a name from newton_schulz.NS_COEFFICIENTS or an explicit (a, b, c).
    `ns_dtype`: Newton-Schulz compute dtype (default bf16 on CUDA, fp32 on CPU).
    A param group may set `split_rows` (default 1; see muon_update), e.g. 2 for fused SwiGLU fc1.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = _HP.momentum,
        nesterov: bool = _HP.nesterov,
        weight_decay: float = 0.1,
        ns_steps: int = _HP.ns_steps,
        coefficients: Coefficients = _HP.coefficients,
        eps: float = _HP.eps,
        ns_dtype: Optional[torch.dtype] = _HP.ns_dtype,
    ) -> None:
        if not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"MuonClip lr must be a finite number >= 0, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"MuonClip momentum must be in [0, 1), got {momentum!r}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"MuonClip weight_decay must be >= 0, got {weight_decay!r}")
        if not (isinstance(ns_steps, int) and ns_steps >= 1):
            raise ValueError(f"MuonClip ns_steps must be an int >= 1, got {ns_steps!r}")
        if not eps > 0:
            raise ValueError(f"MuonClip eps must be > 0, got {eps!r}")
        coefficients = resolve_coefficients(coefficients)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, coefficients=coefficients, eps=eps, ns_dtype=ns_dtype,
                        split_rows=1)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(
                        f"MuonClip takes matrices [out, in] or expert stacks [E, out, in], got a "
                        f"parameter of shape {tuple(p.shape)} (give it to AdamW)"
                    )
                k = group["split_rows"]
                if not (isinstance(k, int) and k >= 1 and p.shape[-2] % k == 0):
                    raise ValueError(
                        f"MuonClip split_rows={k!r} must be an int >= 1 dividing the rows of {tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MuonClip does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    buf_dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=buf_dtype)
                update = muon_update(
                    p.grad, state["momentum_buffer"], momentum=group["momentum"],
                    nesterov=group["nesterov"], ns_steps=group["ns_steps"],
                    coefficients=group["coefficients"], eps=group["eps"], ns_dtype=group["ns_dtype"],
                    split_rows=group["split_rows"],
                )
                apply_muon_update(p, update, lr=group["lr"], weight_decay=group["weight_decay"])
        return loss
