"""The memory-lean autograd op of an adapted layer, and the kernel scaffold it shares with the sparse op.

With ``S[k, i, j] = λ[k, i] · A[k, j] · γ[i, j]`` flattened to ``(r·n, m)`` (row ``k·n + i``) and
``B_flat`` the ``(M, n·r)`` bank view, ``P = B_flat @ S``; ``ΔW = P`` when ``I <= O`` else ``Pᵀ``, and

    y = x (W + s·ΔW)ᵀ + b.

Forward runs either in *weight space* (build ``W + s·ΔW`` with one ``addmm``, then one matmul) or in
*activation space* (``x → S → B``). Backward saves only ``x``, ``λ``, ``γ``, references to ``W`` and
the bank views, and optionally a prebuilt ``W + s·ΔW`` (``prebuilt``); it keeps no ``T × n·r`` activation and
no copy of the bases. ``∂x`` comes from ``"kept"`` (``gy @ prebuilt``), ``"fused"`` (rebuild ``W + s·ΔW``) or
``"act"`` (through the bases), and the ``λ``/``γ`` gradients from ``∂S = B_flatᵀ (gyᵀ x)`` (``"G"``) or
``(gy B_flat)ᵀ x`` (``"act"``), reduced against ``A``, ``γ`` and ``λ`` with batched matmuls.

Every route is decided before the op runs, once per call, by :mod:`randlora.planner` (a
:class:`~randlora.planner.Route`); forward and backward only read it.

The scaffold shared with :mod:`randlora.sparse`: one per-thread scratch pool (:func:`scratch`, CPU only,
freed by :func:`release_workspace`), the out-features rule, the ``(..., I)`` reshape, the backward's
prologue/epilogue and the reduction of ``∂S`` to ``∂λ``, ``∂γ``.
"""

from __future__ import annotations

import inspect
import threading
from typing import Callable

import torch
import torch.nn.functional as F

from . import planner
from .costs import device_costs
from .planner import Route

__all__ = [
    "RandLoraFunction",
    "randlora_linear",
    "scaled_bases",
    "delta_weight",
    "build_weight",
    "release_workspace",
    "workspace",
    "acc_dtype",
]


# ------------------------------------------------------------------------------------------------
# scaffold (shared with sparse.py)
# ------------------------------------------------------------------------------------------------
_WS = threading.local()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype updates are accumulated in for weights of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scratch(role: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """This thread's scratch buffer for ``role`` (one per role and dtype, grown to the largest call), viewed as
    ``shape``; None where the device's row of ``costs.DEVICE_COSTS`` says not to pool (CUDA: the caching
    allocator already does) or grad mode is on (a double-backward graph would keep it).

    The ops' transients (``S``, a rebuilt ``W + s·ΔW``, the sparse route's activation-sized token blocks) are
    the same few sizes at every layer; allocating them afresh between long-lived activations fragments the
    CPU heap (+60–100 MB peak RSS on the Llama step) and costs page faults (46 MB block: 63 ms fresh, 20 ms
    reused). Buffers hold memory, never values: every user overwrites what it reads.
    """
    if not device_costs(device.type).scratch or torch.is_grad_enabled():
        return None
    d = getattr(_WS, "d", None)
    if d is None:
        d = _WS.d = {}
    n = 1
    for v in shape:
        n *= v
    buf = d.get((role, dtype))
    if buf is None or buf.numel() < n:
        buf = d[(role, dtype)] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def workspace() -> dict[tuple[str, torch.dtype], torch.Tensor]:
    """This thread's scratch buffers by ``(role, dtype)`` (``"S"``, ``"W"`` of the dense op; ``"in"``, ``"out"``, ... of
    the sparse op's token blocks): what the pool holds now, for diagnostics and tests."""
    return dict(getattr(_WS, "d", None) or {})


def release_workspace() -> None:
    """Free this thread's scratch buffers, dense and sparse (they are re-created on the next call)."""
    _WS.d = {}


def out_features(I: int, m: int, M: int) -> int:
    """``O`` of an adapter-only call (``W`` None) with input width ``I`` on bases of widths ``m <= M``."""
    return M if I == m and M != m else m


def threads(device_type: str) -> int:
    """The thread count the planner weighs a device's kernels with: torch's on the CPU, 1 elsewhere."""
    return torch.get_num_threads() if device_type == "cpu" else 1


def needs(x: torch.Tensor, W: torch.Tensor | None, lam: torch.Tensor, gam: torch.Tensor) -> tuple[bool, bool, bool]:
    """Which gradients a direct call of an op computes: ``(∂x, ∂λ/∂γ, ∂W)`` (none with grad mode off)."""
    grad = torch.is_grad_enabled()
    return (grad and x.requires_grad, grad and (lam.requires_grad or gam.requires_grad),
            grad and W is not None and W.requires_grad)


def untracked(*tensors: torch.Tensor | None) -> bool:
    """Whether a call records nothing for autograd (grad mode off, or none of ``tensors`` requires grad): the ops
    then run their forward as a plain function: ``autograd.Function.apply`` binds every call's arguments to the
    forward's signature through ``inspect`` (about 12 µs with the signature precomputed, :func:`presign`) and sets
    up a graph node, several times a decode step's matmul at small widths."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def on_rows(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args) -> torch.Tensor:
    """``fn(x2, *args)`` with ``x`` of shape ``(..., I)`` flattened to ``(T, I)``; the result reshaped back."""
    lead = x.shape[:-1]
    y = fn(x.reshape(-1, x.shape[-1]), *args)
    return y.reshape(*lead, y.shape[-1])


def grad_prologue(ctx, gy: torch.Tensor, x: torch.Tensor) -> tuple[tuple[bool, ...], torch.Tensor]:
    """A backward's start: which of ``(x, W, bias, λ, γ)`` need gradients, and ``gy`` in ``x``'s dtype."""
    return tuple(ctx.needs_input_grad[:5]), gy.to(x.dtype)


def grad_epilogue(gy: torch.Tensor, x: torch.Tensor, W: torch.Tensor | None, need: tuple[bool, ...],
                  G: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂W, ∂b)`` as ``need`` asks (``∂W = gyᵀ x``, given as ``G`` when already computed)."""
    gW = gb = None
    if need[1]:
        gW = (G if G is not None else torch.mm(gy.t(), x)).to(W.dtype)
    if need[2]:
        gb = gy.sum(0)
    return gW, gb


def reduce_grads(dS: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, a: torch.Tensor, s: float,
                 need_lam: bool, need_gam: bool, cols: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``∂λ[k,i] = s Σ_j ∂S[k,i,j] A[k,j] γ[i,j]``, ``∂γ[i,j] = s Σ_k ∂S[k,i,j] A[k,j] λ[k,i]`` (float32+).

    ``dS`` holds ``∂S`` at ``J`` columns per row ``k`` (``(r·n, J)`` or ``(r, n, J)``), ``a`` ``(r, J)`` ``A``'s
    values there. ``cols`` None: every column (``J = m``, batched matmuls); else ``(r·J,)`` the columns of each
    row ``k`` (the sparse route's pattern, zero ``a`` at pads): gathers and ``index_add_``.
    """
    r, n = lam.shape
    acc = torch.promote_types(lam.dtype, torch.float32)
    D = dS.to(acc).view(r, n, -1)  # a fresh tensor (or dS itself, ours): scale it in place
    D.mul_(a.to(acc)[:, None, :])
    J = D.shape[2]
    dlam = dgam = None
    if cols is None:
        Dt = D.transpose(0, 1)  # (n, r, m), a view
        if need_lam:
            dlam = torch.bmm(Dt, gam.to(acc).unsqueeze(2)).squeeze(2).t().mul_(s).to(lam.dtype)
        if need_gam:
            dgam = torch.bmm(lam.to(acc).t().unsqueeze(1), Dt).squeeze(1).mul_(s).to(gam.dtype)
        return dlam, dgam
    if need_lam:
        g = gam.to(acc).index_select(1, cols).view(n, r, J).transpose(0, 1)  # (r, n, J)
        dlam = (D * g).sum(2).mul_(s).to(lam.dtype)
    if need_gam:
        E = (D * lam.to(acc)[:, :, None]).transpose(0, 1).reshape(n, r * J)
        m = gam.shape[1]
        dgam = torch.zeros(n, m, dtype=acc, device=D.device).index_add_(1, cols, E).mul_(s).to(gam.dtype)
    return dlam, dgam


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------
def scaled_bases(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, dtype: torch.dtype,
                 ws_ok: bool = False) -> torch.Tensor:
    """``S`` flattened to ``(r·n, m)``: ``S[k·n + i, j] = λ[k, i] · A[k, j] · γ[i, j]``.

    ``ws_ok``: write it into the thread's scratch buffer (only for values used within one op call)."""
    r, n = lam.shape
    acc = torch.promote_types(lam.dtype, A.dtype)
    ws = scratch("S", (r, n, A.shape[1]), acc, A.device) if (ws_ok and acc == dtype) else None
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
    ws = scratch("W", (a.shape[0], b.shape[1]), S.dtype, S.device) if ws_ok else None
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
# the op
# ------------------------------------------------------------------------------------------------
def _grad_x(route: Route, gy: torch.Tensor, Wc: torch.Tensor | None, S: torch.Tensor | None, Bc: torch.Tensor,
            prebuilt: torch.Tensor | None, s: float, tr: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``∂x`` by ``route.grad_x``, and ``gy B_flat`` when that route computed it (shared with ``∂S``)."""
    xr = route.grad_x
    if xr == "kept":
        return torch.mm(gy, prebuilt), None
    if xr == "fused":
        return torch.mm(gy, _build(Wc, S, Bc, s, tr, ws_ok=True)), None
    if xr != "act":
        return None, None
    if tr:
        h = torch.mm(gy, S.t())
        return (torch.mm(gy, Wc).addmm_(h, Bc.t(), alpha=s) if Wc is not None else torch.mm(h, Bc.t()).mul_(s)), None
    u = torch.mm(gy, Bc)
    return (torch.mm(gy, Wc).addmm_(u, S, alpha=s) if Wc is not None else torch.mm(u, S).mul_(s)), u


def _grad_S(route: Route, gy: torch.Tensor, x: torch.Tensor, Bc: torch.Tensor, G: torch.Tensor | None,
            u: torch.Tensor | None, tr: bool) -> torch.Tensor:
    """``∂S`` ``(r·n, m)`` by ``route.grad_S``."""
    if route.grad_S == "G":
        return torch.mm(Bc.t(), G.t() if tr else G)
    if tr:
        return torch.mm(torch.mm(x, Bc).t(), gy)
    return torch.mm((u if u is not None else torch.mm(gy, Bc)).t(), x)


class _DenseOp(torch.autograd.Function):
    """The op on a planned :class:`~randlora.planner.Route` (see :class:`RandLoraFunction`)."""

    @staticmethod
    def forward(x, W, bias, lam, gam, A, B, s, route, prebuilt):  # type: ignore[override]
        cd = x.dtype
        T, I = x.shape
        bc = bias.to(cd) if bias is not None else None
        if route.forward == "kept":
            return F.linear(x, prebuilt, bc)
        O = W.shape[0] if W is not None else out_features(I, A.shape[1], B.shape[0])
        tr = O < I
        S = scaled_bases(lam, gam, A, cd, ws_ok=True)
        Bc, Wc = B.to(cd), (W.to(cd) if W is not None else None)
        if route.forward == "weight":
            return F.linear(x, _build(Wc, S, Bc, s, tr, ws_ok=True), bc)
        y = F.linear(x, Wc, bc) if Wc is not None else x.new_zeros(T, O)
        if tr:
            return y.addmm_(x @ Bc, S, alpha=s)
        return y.addmm_(x @ S.t(), Bc.t(), alpha=s)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, W, bias, lam, gam, A, B, s, route, prebuilt = inputs
        ctx.save_for_backward(x, W, lam, gam, A, B, prebuilt)
        ctx.s, ctx.route = s, route

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, W, lam, gam, A, B, prebuilt = ctx.saved_tensors
        s, route = ctx.s, ctx.route
        need, gy = grad_prologue(ctx, gy, x)
        cd = x.dtype
        tr = gy.shape[1] < x.shape[1]
        Bc, Wc = B.to(cd), (W.to(cd) if W is not None else None)
        S = scaled_bases(lam, gam, A, cd, ws_ok=True) if route.grad_x in ("fused", "act") else None
        G = torch.mm(gy.t(), x) if (need[1] or route.grad_S == "G") else None
        gx, u = _grad_x(route, gy, Wc, S, Bc, prebuilt, s, tr)
        del S
        dlam = dgam = None
        if need[3] or need[4]:
            dS = _grad_S(route, gy, x, Bc, G, u, tr)
            del u
            dlam, dgam = reduce_grads(dS, lam, gam, A, s, need[3], need[4])
        gW, gb = grad_epilogue(gy, x, W, need, G)
        return gx, gW, gb, dlam, dgam, None, None, None, None, None


def presign(op: type[torch.autograd.Function]) -> None:
    """Give ``op.forward`` its ``inspect`` signature once: ``autograd.Function.apply`` (with ``setup_context``)
    binds every call's arguments to it, and computing the signature each time cost about 30 µs per call."""
    op.forward.__signature__ = inspect.signature(op.forward)


presign(_DenseOp)


def _route_of(x: torch.Tensor, W: torch.Tensor | None, lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor,
              B: torch.Tensor, path: str, prebuilt: torch.Tensor | None) -> Route:
    """The route of a direct call of the op (the layer plans its calls itself: :func:`planner.plan_call`)."""
    T, I = x.shape
    O = W.shape[0] if W is not None else out_features(I, A.shape[1], B.shape[0])
    need_x, need_S, need_W = needs(x, W, lam, gam)
    return planner.op_route(T, O, I, lam.numel(), with_weight=W is not None, path=path, need_x=need_x,
                            need_S=need_S, need_W=need_W, kept=prebuilt is not None)


class RandLoraFunction(_DenseOp):
    """``y = x (W + s·ΔW)ᵀ + b`` (``W`` None: ``y = s · x ΔWᵀ``). ``x`` is ``(T, I)`` in the compute dtype.

    ``RandLoraFunction.apply(x, W, bias, lam, gam, A, B, s, path="auto", prebuilt=None)``: ``path`` is ``"auto"``,
    ``"weight"``, ``"activation"`` (the route is then planned here, once) or a planned
    :class:`~randlora.planner.Route`. ``prebuilt``: optional prebuilt ``W + s·ΔW`` (compute dtype, no grad); it
    is used for the forward and kept for ``∂x``.
    """

    @classmethod
    def apply(cls, x, W, bias, lam, gam, A, B, s, path="auto", prebuilt=None):  # type: ignore[override]
        route = path if isinstance(path, Route) else _route_of(x, W, lam, gam, A, B, path, prebuilt)
        return _DenseOp.apply(x, W, bias, lam, gam, A, B, s, route, prebuilt)


def randlora_linear(x: torch.Tensor, W: torch.Tensor | None, bias: torch.Tensor | None, lam: torch.Tensor,
                    gam: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
                    path: str | Route = "auto", prebuilt: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the op to ``x`` of shape ``(..., I)``: ``y = x (W + s·ΔW)ᵀ + b`` with ``W`` of shape ``(O, I)``.

    ``path``: ``"auto"``, ``"weight"``, ``"activation"`` or a planned :class:`~randlora.planner.Route`.
    ``prebuilt``: optional prebuilt ``W + s·ΔW`` (see :func:`build_weight`), reused for forward and ``∂x``.
    """
    def run(x2: torch.Tensor) -> torch.Tensor:
        route = path if isinstance(path, Route) else _route_of(x2, W, lam, gam, A, B, path, prebuilt)
        # always pass every argument: torch.compile, inlining the op when nothing needs grad, mistakes an
        # omitted defaulted argument for a ctx-style forward and gives ``x`` the ctx (a graph break)
        op = _DenseOp.forward if untracked(x2, W, bias, lam, gam) else _DenseOp.apply
        return op(x2, W, bias, lam, gam, A, B, s, route, prebuilt)

    return on_rows(run, x)
