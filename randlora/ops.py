"""The memory-lean autograd op of an adapted layer, and the cost model that picks its routes per call.

With ``S[k, i, j] = λ[k, i] · A[k, j] · γ[i, j]`` flattened to ``(r·n, m)`` (row ``k·n + i``) and
``B_flat`` the ``(M, n·r)`` bank view, ``P = B_flat @ S``; ``ΔW = P`` when ``I <= O`` else ``Pᵀ``, and

    y = x (W + s·ΔW)ᵀ + b.

Forward runs either in *weight space* (build ``W + s·ΔW`` with one ``addmm``, then one matmul) or in
*activation space* (``x → S → B``). Backward saves only ``x``, ``λ``, ``γ``, references to ``W`` and
the bank views, and optionally a prebuilt ``W + s·ΔW`` (``weff``, see :func:`keep_pays`); it keeps no
``T × n·r`` activation and no copy of the bases. Per call it picks the cheapest way to get ``∂x``
(``"kept"``: ``gy @ weff``; ``"fused"``: rebuild ``W + s·ΔW``; ``"act"``: through the bases) and the
``λ``/``γ`` gradients, which only need ``∂S = B_flatᵀ (gyᵀ x)`` (``"G"``) or ``(gy B_flat)ᵀ x``
(``"act"``), reduced against ``A``, ``γ`` and ``λ`` with batched matmuls.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "RandLoraFunction",
    "randlora_linear",
    "scaled_bases",
    "delta_weight",
    "build_weight",
    "plan",
    "keep_pays",
    "forward_costs",
    "backward_costs",
    "release_workspace",
    "acc_dtype",
    "PATHS",
    "KEEP_POLICIES",
]

PATHS = ("auto", "weight", "activation")
KEEP_POLICIES = ("auto", "always", "never")

# A kept ``W + s·ΔW`` may use at most this many times the memory of the layer's saved input (``T × I``,
# which backward keeps anyway); see :func:`keep_pays` and docs/performance.md for the measured trade-off.
KEEP_MEMORY_RATIO = 1.0
# ... and this many times when the layer caches ``s·ΔW`` (inside ``randlora.cached``): the build is then
# shared by the calls of an evaluation loop or of the micro-batches of an accumulation step.
KEEP_REUSE_RATIO = 3.0


_WS = threading.local()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype updates are accumulated in for weights of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _workspace(role: str, shape: tuple, like: torch.Tensor) -> torch.Tensor | None:
    """A per-thread scratch buffer reused by every call (CPU only).

    The op's transients (``S``, the rebuilt ``W + s·ΔW``) are the same few sizes at every layer; allocating
    them afresh between long-lived activations fragments the CPU heap and raised the step's peak RSS by
    about 60–100 MB on the Llama benchmark. One buffer per role and dtype, grown to the largest layer.
    """
    if like.device.type != "cpu" or torch.is_grad_enabled():  # (grad on: a double-backward graph)
        return None
    d = getattr(_WS, "d", None)
    if d is None:
        d = _WS.d = {}
    key = (role, like.dtype)
    buf = d.get(key)
    n = 1
    for v in shape:
        n *= v
    if buf is None or buf.numel() < n:
        buf = d[key] = torch.empty(n, dtype=like.dtype)
    return buf[:n].view(shape)


def release_workspace() -> None:
    """Free this thread's scratch buffers (they are re-created on the next call)."""
    _WS.d = {}


def scaled_bases(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, dtype: torch.dtype,
                  ws_ok: bool = False) -> torch.Tensor:
    """``S`` flattened to ``(r·n, m)``: ``S[k·n + i, j] = λ[k, i] · A[k, j] · γ[i, j]``.

    ``ws_ok``: write it into the thread's scratch buffer (only for values used within one op call)."""
    r, n = lam.shape
    acc = torch.promote_types(lam.dtype, A.dtype)
    ws = _workspace("S", (r, n, A.shape[1]), A.to(acc)) if (ws_ok and acc == dtype) else None
    if ws is not None:
        S = torch.mul(A.to(acc)[:, None, :], gam.to(acc)[None], out=ws)
    else:
        S = torch.mul(A.to(acc)[:, None, :], gam.to(acc)[None])  # the only r×n×m temporary
    S.mul_(lam.to(acc)[:, :, None])
    return S.view(r * n, -1).to(dtype)


def _build(W: torch.Tensor | None, S: torch.Tensor, B: torch.Tensor, s: float, tr: bool,
           ws_ok: bool = False) -> torch.Tensor:
    """``W + s·ΔW`` (or ``s·ΔW`` when ``W`` is None) as an ``(O, I)`` tensor, one ``addmm``."""
    a, b = (S.t(), B.t()) if tr else (B, S)
    ws = _workspace("W", (a.shape[0], b.shape[1]), S) if ws_ok else None
    if W is None:
        return torch.mm(a, b, out=ws).mul_(s) if ws is not None else torch.mm(a, b).mul_(s)
    if ws is not None:
        return torch.addmm(W, a, b, alpha=s, out=ws)
    return torch.addmm(W, a, b, alpha=s)


def delta_weight(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
                 transposed: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``s·ΔW`` of shape ``(O, I)``, computed in ``dtype``."""
    S = scaled_bases(lam, gam, A, dtype)
    return _build(None, S, B.to(dtype), s, transposed)


@torch.no_grad()
def build_weight(W: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 s: float, transposed: bool, dtype: torch.dtype, acc: torch.dtype | None = None) -> torch.Tensor:
    """``W + s·ΔW`` (``W`` given as ``(O, I)``) accumulated in ``acc`` (default ``dtype``), returned in ``dtype``."""
    acc = dtype if acc is None else acc
    S = scaled_bases(lam, gam, A, acc)
    return _build(W.to(acc), S, B.to(acc), s, transposed).to(dtype)


# ------------------------------------------------------------------------------------------------
# cost model (multiply-adds)
# ------------------------------------------------------------------------------------------------
def forward_costs(T: int, O: int, I: int, nr: int, fused: bool, kept: bool = False) -> dict[str, int]:
    """Extra multiply-adds over the frozen layer for each forward path (``kept``: ``W + s·ΔW`` prebuilt)."""
    build = 0 if kept else max(O, I) * nr * min(O, I)
    return {
        "weight": build + (0 if fused else T * O * I),
        "activation": T * nr * (O + I),
    }


def backward_costs(T: int, O: int, I: int, nr: int, tr: bool, fused: bool, need_x: bool, need_S: bool,
                   need_W: bool, kept: bool = False) -> dict[tuple[str | None, str | None], int]:
    """Extra multiply-adds over the frozen layer's backward for each (∂x route, ∂S route).

    ∂x: ``"kept"`` (``gy @ weff``, free), ``"fused"`` (rebuild ``W + s·ΔW``), ``"act"`` (through the
    bases). ∂S: ``"G"`` (``B_flatᵀ (gyᵀ x)``) or ``"act"`` (``(gy B_flat)ᵀ x``; shares ``gy B_flat`` with
    the ``"act"`` ∂x route when ``I <= O``).
    """
    build = max(O, I) * nr * min(O, I)
    G = T * O * I
    if need_x:
        xr = ["kept", "act"] if kept and fused else ["fused", "act"]
    else:
        xr = [None]
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


def plan(T: int, O: int, I: int, nr: int, *, fused: bool = True, path: str = "auto", need_x: bool = True,
         need_S: bool = True, need_W: bool = False, kept: bool = False) -> dict[str, Any]:
    """The routes the op takes for a call of ``T`` tokens, with their costs (multiply-adds).

    ``kept``: a prebuilt ``W + s·ΔW`` is passed in (forward is then one plain matmul with it).
    """
    tr = O < I
    kept = kept and fused
    fc = forward_costs(T, O, I, nr, fused, kept)
    if kept:
        fwd = "weight"
    else:
        fwd = min(fc, key=fc.__getitem__) if path == "auto" else path
    bc = backward_costs(T, O, I, nr, tr, fused, need_x, need_S, need_W, kept)
    if path == "weight":
        bc = {k: v for k, v in bc.items() if k[0] in ("kept", "fused", None) and k[1] in ("G", None)}
    elif path == "activation":
        bc = {k: v for k, v in bc.items() if k[0] in ("act", None) and k[1] in ("act", None)}
    bwd = min(bc, key=bc.__getitem__)
    return {"forward": fwd, "forward_cost": fc[fwd], "backward": bwd, "backward_cost": bc[bwd],
            "base_cost": 2 * T * O * I}


def keep_pays(T: int, O: int, I: int, nr: int, path: str = "auto", policy: str = "auto",
              need_x: bool = True, reuse: bool = False) -> bool:
    """Whether to build ``W + s·ΔW`` once and keep it for backward (and for further micro-batches).

    ``"auto"``: when that lowers the step's multiply-adds AND the kept ``O × I`` matrix is no larger than
    ``KEEP_MEMORY_RATIO`` times the ``T × I`` input that backward saves anyway (``O <= ratio · T``).
    ``reuse``: the layer caches ``s·ΔW`` (an explicit setting, see :func:`randlora.cached`), so the build
    is shared by several calls: it is not counted, and the memory bound is ``KEEP_REUSE_RATIO``.
    A pure function of its arguments: the same call always takes the same route.
    """
    if policy not in KEEP_POLICIES:
        raise ValueError(f"keep must be one of {KEEP_POLICIES}, got {policy!r}")
    if policy == "never" or path == "activation":
        return False
    if policy == "always":
        return True
    if O > (KEEP_REUSE_RATIO if reuse else KEEP_MEMORY_RATIO) * T:
        return False
    a = plan(T, O, I, nr, path=path, need_x=need_x)
    b = plan(T, O, I, nr, path=path, need_x=need_x, kept=True)
    build = 0 if reuse else max(O, I) * nr * min(O, I)  # shared by the micro-batches when reused
    return b["forward_cost"] + b["backward_cost"] + build < a["forward_cost"] + a["backward_cost"]


# ------------------------------------------------------------------------------------------------
# the op
# ------------------------------------------------------------------------------------------------
def _reduce(dS: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, s: float,
            need_lam: bool, need_gam: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``∂λ[k,i] = s Σ_j ∂S[k,i,j] A[k,j] γ[i,j]``, ``∂γ[i,j] = s Σ_k ∂S[k,i,j] A[k,j] λ[k,i]`` (float32+)."""
    r, n = lam.shape
    acc = torch.promote_types(lam.dtype, torch.float32)
    D = dS.to(acc).view(r, n, -1)  # a fresh tensor (or dS itself, ours): scale it in place
    D.mul_(A.to(acc)[:, None, :])
    Dt = D.transpose(0, 1)  # (n, r, m), a view
    dlam = dgam = None
    if need_lam:
        dlam = torch.bmm(Dt, gam.to(acc).unsqueeze(2)).squeeze(2).t().mul_(s).to(lam.dtype)
    if need_gam:
        dgam = torch.bmm(lam.to(acc).t().unsqueeze(1), Dt).squeeze(1).mul_(s).to(gam.dtype)
    return dlam, dgam


class RandLoraFunction(torch.autograd.Function):
    """``y = x (W + s·ΔW)ᵀ + b`` (``W`` None: ``y = s · x ΔWᵀ``). ``x`` is ``(T, I)`` in the compute dtype.

    ``weff``: optional prebuilt ``W + s·ΔW`` (compute dtype, no grad); it is used for the forward and
    kept for ``∂x``.
    """

    @staticmethod
    def forward(x, W, bias, lam, gam, A, B, s, path, weff=None):  # type: ignore[override]
        cd = x.dtype
        T, I = x.shape
        bc = bias.to(cd) if bias is not None else None
        if weff is not None:
            return F.linear(x, weff, bc)
        r, n = lam.shape
        O = _out_features(W, I, A, B)
        tr = O < I
        p = plan(T, O, I, r * n, fused=W is not None, path=path)
        S = scaled_bases(lam, gam, A, cd, ws_ok=True)
        Bc, Wc = B.to(cd), (W.to(cd) if W is not None else None)
        if p["forward"] == "weight":
            Weff = _build(Wc, S, Bc, s, tr, ws_ok=True)
            return F.linear(x, Weff, bc)
        y = F.linear(x, Wc, bc) if Wc is not None else x.new_zeros(T, O)
        if tr:
            return y.addmm_(x @ Bc, S, alpha=s)
        return y.addmm_(x @ S.t(), Bc.t(), alpha=s)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, W, bias, lam, gam, A, B, s, path, *rest = inputs
        weff = rest[0] if rest else None
        ctx.save_for_backward(x, W, lam, gam, A, B, weff)
        ctx.s, ctx.path = s, path
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, W, lam, gam, A, B, weff = ctx.saved_tensors
        s = ctx.s
        need_x, need_W, need_b, need_lam, need_gam = ctx.needs_input_grad[:5]
        need_S = need_lam or need_gam
        cd = x.dtype
        gy = gy.to(cd)
        T, I = x.shape
        O = gy.shape[1]
        tr = O < I
        r, n = lam.shape
        p = plan(T, O, I, r * n, fused=W is not None, path=ctx.path, need_x=need_x, need_S=need_S,
                 need_W=need_W, kept=weff is not None)
        xr, sr = p["backward"]
        Bc, Wc = B.to(cd), (W.to(cd) if W is not None else None)
        S = scaled_bases(lam, gam, A, cd, ws_ok=True) if xr in ("fused", "act") else None
        gx = gW = gb = dlam = dgam = None
        G = torch.mm(gy.t(), x) if (need_W or sr == "G") else None
        u = None
        if xr == "kept":
            gx = torch.mm(gy, weff)
        elif xr == "fused":
            gx = torch.mm(gy, _build(Wc, S, Bc, s, tr, ws_ok=True))
        elif xr == "act":
            if tr:
                h = torch.mm(gy, S.t())
                gx = torch.mm(gy, Wc).addmm_(h, Bc.t(), alpha=s) if Wc is not None else torch.mm(h, Bc.t()).mul_(s)
            else:
                u = torch.mm(gy, Bc)
                gx = torch.mm(gy, Wc).addmm_(u, S, alpha=s) if Wc is not None else torch.mm(u, S).mul_(s)
            del S
        if need_S:
            if sr == "G":
                dS = torch.mm(Bc.t(), G.t() if tr else G)
            elif tr:
                dS = torch.mm(torch.mm(x, Bc).t(), gy)
            else:
                dS = torch.mm((u if u is not None else torch.mm(gy, Bc)).t(), x)
            del u
            dlam, dgam = _reduce(dS, lam, gam, A, s, need_lam, need_gam)
        if need_W:
            gW = G.to(W.dtype)
        if need_b:
            gb = gy.sum(0)
        return gx, gW, gb, dlam, dgam, None, None, None, None, None


def _out_features(W: torch.Tensor | None, I: int, A: torch.Tensor, B: torch.Tensor) -> int:
    if W is not None:
        return W.shape[0]
    m, M = A.shape[1], B.shape[0]
    return M if I == m and M != m else m


def randlora_linear(x: torch.Tensor, W: torch.Tensor | None, bias: torch.Tensor | None, lam: torch.Tensor,
                    gam: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
                    path: str = "auto", weff: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the op to ``x`` of shape ``(..., I)``: ``y = x (W + s·ΔW)ᵀ + b`` with ``W`` of shape ``(O, I)``.

    ``weff``: optional prebuilt ``W + s·ΔW`` (see :func:`build_weight`), reused for forward and ``∂x``.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    # always pass every argument: torch.compile, inlining the op when nothing needs grad, mistakes an
    # omitted defaulted argument for a ctx-style forward and gives ``x`` the ctx (a graph break)
    y = RandLoraFunction.apply(x2, W, bias, lam, gam, A, B, s, path, weff)
    return y.reshape(*lead, y.shape[-1])
