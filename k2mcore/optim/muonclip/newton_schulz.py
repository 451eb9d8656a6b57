"""Newton-Schulz orthogonalization for Muon (K2 / Moonlight), on one matrix or a batch of experts.

X0 = G / (||G||_F + eps) (per matrix), transposed when rows > cols so that X is p x q with p <= q;
then `steps` times:  A = X X^T;  X <- a X + (b A + c A^2) X.
The quintic (3.4445, -4.7750, 2.0315) maximizes the slope at zero; it does not converge to UV^T
but to U S' V^T with S' roughly in [0.7, 1.2] (Keller Jordan's Muon post).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .shard_plan import ns_flops  # noqa: F401  (defined without torch, for the planner)

K2_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

#: named coefficient sets, selectable by name in MuonClip(coefficients=...)
NS_COEFFICIENTS: dict[str, tuple[float, float, float]] = {
    "k2": K2_COEFFS,
    "muon": K2_COEFFS,  # Keller Jordan's Muon, = torch.optim.Muon's default
}

Coefficients = Union[str, Sequence[float]]


def resolve_coefficients(coefficients: Coefficients) -> tuple[float, float, float]:
    """A name from NS_COEFFICIENTS or an explicit (a, b, c); one-line ValueError otherwise."""
    if isinstance(coefficients, str):
        if coefficients not in NS_COEFFICIENTS:
            raise ValueError(
                f"unknown Newton-Schulz coefficient set {coefficients!r}; "
                f"known: {', '.join(sorted(NS_COEFFICIENTS))}"
            )
        return NS_COEFFICIENTS[coefficients]
    coeffs = tuple(float(c) for c in coefficients)
    if len(coeffs) != 3:
        raise ValueError(f"Newton-Schulz coefficients must be 3 numbers (a, b, c), got {len(coeffs)}")
    return coeffs  # type: ignore[return-value]


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (as torch.optim.Muon and Moonlight), fp32 elsewhere (CPU bf16 matmul is slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: Coefficients = K2_COEFFS,
    eps: float = 1e-7,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Orthogonalize G ([p, q] or a batch [E, p, q], each matrix on its own); returns G's dtype.

    `dtype` is the compute dtype (default: bf16 on CUDA, fp32 on CPU).
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz needs a matrix [p, q] or a batch [E, p, q], got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"newton_schulz steps must be >= 0, got {steps}")
    a, b, c = resolve_coefficients(coefficients)
    dtype = dtype or default_ns_dtype(G.device)
    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)  # Frobenius norm per matrix
    if X.ndim == 2:
        for _ in range(steps):
            A = X @ X.mT
            B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
            X = torch.addmm(X, B, X, beta=a)  # a X + B X
    else:
        for _ in range(steps):
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
    if transposed:
        X = X.mT
    return X.to(G.dtype).contiguous()


