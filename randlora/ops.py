"""The memory-lean autograd op of an adapted layer, and the cost model that picks its path per call.

With ``S[k, i, j] = λ[k, i] · A[k, j] · γ[i, j]`` flattened to ``(r·n, m)`` (row ``k·n + i``) and
``B_flat`` the ``(M, n·r)`` bank view, ``P = B_flat @ S``; ``ΔW = P`` when ``I <= O`` else ``Pᵀ``, and

    y = x (W + s·ΔW)ᵀ + b.

Forward runs either in *weight space* (build ``W + s·ΔW``, one matmul) or in *activation space*
(``x → S → B``). Backward saves only ``x``, ``λ``, ``γ`` and references to ``W`` and the bank views
(no ``T × n·r`` activation, no scaled-basis copy) and, per call, picks the cheapest way to get
``∂x`` and the ``λ``/``γ`` gradients (the projection of ``gyᵀ x`` onto the bases).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["RandLoraFunction", "randlora_linear", "scaled_bases", "delta_weight", "plan", "PATHS"]

PATHS = ("auto", "weight", "activation")


def scaled_bases(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``S`` flattened to ``(r·n, m)``: ``S[k·n + i, j] = λ[k, i] · A[k, j] · γ[i, j]``."""
    r, n = lam.shape
    acc = torch.promote_types(lam.dtype, A.dtype)
    S = A.to(acc)[:, None, :] * gam.to(acc)[None]
    S.mul_(lam.to(acc)[:, :, None])
    return S.view(r * n, -1).to(dtype)


def _build(W: torch.Tensor | None, S: torch.Tensor, B: torch.Tensor, s: float, tr: bool) -> torch.Tensor:
    """``W + s·ΔW`` (or ``s·ΔW`` when ``W`` is None) as a new ``(O, I)`` tensor."""
    a, b = (S.t(), B.t()) if tr else (B, S)
    if W is None:
        return torch.mm(a, b).mul_(s)
    return torch.addmm(W, a, b, alpha=s)


def delta_weight(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
                 transposed: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``s·ΔW`` of shape ``(O, I)``, computed in ``dtype``."""
    S = scaled_bases(lam, gam, A, dtype)
    return _build(None, S, B.to(dtype), s, transposed)


# ------------------------------------------------------------------------------------------------
# cost model (multiply-adds)
# ------------------------------------------------------------------------------------------------
def forward_costs(T: int, O: int, I: int, nr: int, fused: bool) -> dict[str, int]:
    """Extra multiply-adds over the frozen layer for each forward path."""
    build = max(O, I) * nr * min(O, I)
    return {
        "weight": build + (0 if fused else T * O * I),
        "activation": T * nr * (O + I),
    }


def backward_costs(T: int, O: int, I: int, nr: int, tr: bool, fused: bool,
                   need_x: bool, need_S: bool, need_W: bool) -> dict[tuple[str | None, str | None], int]:
    """Extra multiply-adds over the frozen layer's backward for each (∂x route, ∂S route)."""
    build = max(O, I) * nr * min(O, I)
    G = T * O * I
    xr = ["fused", "act"] if need_x else [None]
    sr = ["G", "act"] if need_S else [None]
    out = {}
    for a in xr:
        for b in sr:
            c = G if (need_W or b == "G") else 0  # gyᵀx
            if a == "fused":
                c += build + (0 if fused else T * O * I)
            elif a == "act":
                c += T * nr * (O + I)
            if b == "G":
                c += build
            elif b == "act":
                if tr:
                    c += T * I * nr + T * nr * O  # (x B)ᵀ gy
                else:
                    c += T * nr * I + (0 if a == "act" else T * O * nr)  # (gy B)ᵀ x, gy B shared
            out[(a, b)] = c
    return out


def plan(T: int, O: int, I: int, nr: int, *, fused: bool = True, path: str = "auto",
         need_x: bool = True, need_S: bool = True, need_W: bool = False) -> dict[str, Any]:
    """The routes the op takes for a call of ``T`` tokens, with their costs (multiply-adds)."""
    tr = O < I
    fc = forward_costs(T, O, I, nr, fused)
    fwd = min(fc, key=fc.__getitem__) if path == "auto" else path
    bc = backward_costs(T, O, I, nr, tr, fused, need_x, need_S, need_W)
    if path == "weight":
        bc = {k: v for k, v in bc.items() if k[0] in ("fused", None) and k[1] in ("G", None)}
    elif path == "activation":
        bc = {k: v for k, v in bc.items() if k[0] in ("act", None) and k[1] in ("act", None)}
    bwd = min(bc, key=bc.__getitem__)
    return {"forward": fwd, "forward_cost": fc[fwd], "backward": bwd, "backward_cost": bc[bwd],
            "base_cost": 2 * T * O * I}


# ------------------------------------------------------------------------------------------------
# the op
# ------------------------------------------------------------------------------------------------
class RandLoraFunction(torch.autograd.Function):
    """``y = x (W + s·ΔW)ᵀ + b`` (``W`` None: ``y = s · x ΔWᵀ``). ``x`` is ``(T, I)`` in the compute dtype."""

    @staticmethod
    def forward(x, W, bias, lam, gam, A, B, s, path):  # type: ignore[override]
        cd = x.dtype
        T, I = x.shape
        r, n = lam.shape
        O = _out_features(W, I, A, B)
        tr = O < I
        p = plan(T, O, I, r * n, fused=W is not None, path=path)
        S = scaled_bases(lam, gam, A, cd)
        Bc, Wc = B.to(cd), (W.to(cd) if W is not None else None)
        bc = bias.to(cd) if bias is not None else None
        if p["forward"] == "weight":
            return F.linear(x, _build(Wc, S, Bc, s, tr), bc)
        y = F.linear(x, Wc, bc) if Wc is not None else x.new_zeros(T, O)
        if tr:
            return y.addmm_(x @ Bc, S, alpha=s)
        return y.addmm_(x @ S.t(), Bc.t(), alpha=s)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, W, bias, lam, gam, A, B, s, path = inputs
        ctx.save_for_backward(x, W, lam, gam, A, B)
        ctx.s, ctx.path = s, path
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, W, lam, gam, A, B = ctx.saved_tensors
        s = ctx.s
        need_x, need_W, need_b, need_lam, need_gam = ctx.needs_input_grad[:5]
        need_S = need_lam or need_gam
        cd = x.dtype
        gy = gy.to(cd)
        T, I = x.shape
        O = gy.shape[1]
        tr = O < I
        r, n = lam.shape
        p = plan(T, O, I, r * n, fused=W is not None, path=ctx.path,
                 need_x=need_x, need_S=need_S, need_W=need_W)
        xr, sr = p["backward"]
        S = scaled_bases(lam, gam, A, cd)
        Bc, Wc = B.to(cd), (W.to(cd) if W is not None else None)
        gx = gW = gb = dlam = dgam = None
        G = torch.mm(gy.t(), x) if (need_W or sr == "G") else None
        u = None
        if xr == "fused":
            gx = gy @ _build(Wc, S, Bc, s, tr)
        elif xr == "act":
            gx = gy @ Wc if Wc is not None else gy.new_zeros(T, I)
            if tr:
                gx.addmm_(gy @ S.t(), Bc.t(), alpha=s)
            else:
                u = gy @ Bc
                gx.addmm_(u, S, alpha=s)
        if need_S:
            if sr == "G":
                dS = torch.mm(Bc.t(), G.t() if tr else G)
            elif tr:
                dS = torch.mm((x @ Bc).t(), gy)
            else:
                dS = torch.mm((u if u is not None else gy @ Bc).t(), x)
            acc = torch.promote_types(lam.dtype, torch.float32)
            D = dS.to(acc).view(r, n, -1).mul_(A.to(acc)[:, None, :])
            if need_lam:
                dlam = torch.einsum("kij,ij->ki", D, gam.to(acc)).mul_(s).to(lam.dtype)
            if need_gam:
                dgam = torch.einsum("kij,ki->ij", D, lam.to(acc)).mul_(s).to(gam.dtype)
        if need_W:
            gW = G.to(W.dtype)
        if need_b:
            gb = gy.sum(0)
        return gx, gW, gb, dlam, dgam, None, None, None, None


def _out_features(W: torch.Tensor | None, I: int, A: torch.Tensor, B: torch.Tensor) -> int:
    if W is not None:
        return W.shape[0]
    m, M = A.shape[1], B.shape[0]
    return M if I == m and M != m else m


def randlora_linear(x: torch.Tensor, W: torch.Tensor | None, bias: torch.Tensor | None, lam: torch.Tensor,
                    gam: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
                    path: str = "auto") -> torch.Tensor:
    """Apply the op to ``x`` of shape ``(..., I)``: ``y = x (W + s·ΔW)ᵀ + b`` with ``W`` of shape ``(O, I)``."""
    lead = x.shape[:-1]
    y = RandLoraFunction.apply(x.reshape(-1, x.shape[-1]), W, bias, lam, gam, A, B, s, path)
    return y.reshape(*lead, y.shape[-1])
