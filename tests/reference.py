"""Independent float64 reference of RandLora, written straight from the definition.

ΔW = s · Σ_{i<n} B_i diag(λ_i) A diag(γ_i)  on the (M, m) side, transposed when O < I, where
B_i[:, k] = B[p, c // r, c % r] for c = k·n + i (columns i, n+i, … of the flattened (M, n·r) bank view).
"""

from __future__ import annotations

import math

import torch


def reference_delta(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, B: torch.Tensor, O: int, I: int,
                    scale: float) -> torch.Tensor:
    """``s·ΔW`` of shape ``(O, I)`` in float64 by explicit sums over the ``n`` bases."""
    r, n = lam.shape
    m, M = min(O, I), max(O, I)
    A = A.double()[:r, :m]
    Bf = B.double()[:M, :n, :].reshape(M, n * r)
    P = torch.zeros(M, m, dtype=torch.float64)
    for i in range(n):
        Bi = torch.stack([Bf[:, k * n + i] for k in range(r)], dim=1)  # (M, r)
        P += Bi @ torch.diag(lam.double()[:, i]) @ A @ torch.diag(gam.double()[i])
    D = scale * P
    return D if I <= O else D.t()


def reference_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """``y = x (W + ΔW)ᵀ + b`` in float64."""
    y = x.double() @ (W.double() + delta).t()
    return y if b is None else y + b.double()


def layer_delta(layer) -> torch.Tensor:
    """Reference ``s·ΔW`` of a ``RandLoraLinear`` from its parameters and its bank."""
    bank = layer.bank
    return reference_delta(layer.randlora_lambda.detach(), layer.randlora_gamma.detach(), bank.A, bank.B,
                           layer.out_features, layer.in_features, layer.scaling)


def n_bases(O: int, I: int, r: int) -> int:
    return math.ceil(min(O, I) / r)
