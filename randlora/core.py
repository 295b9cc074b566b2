"""The functional core: what an adapted weight computes, for any layer type, given an adapter and the bank.

A layer type (a linear layer, a convolution's kernel matrix, an attention projection, expert tensors) needs
only these functions; none of them knows how the layer is laid out or routes its calls:

* :func:`delta_weight` — ``s·ΔW`` of an adapter as an ``(O, I)`` matrix, differentiable in ``λ``, ``γ``;
* :func:`adapted_weight` — ``W + s·ΔW`` accumulated as a merge does (for parents that read a weight);
* :func:`project_grad` — a weight-shaped gradient ``∂(s·ΔW)`` onto ``(∂λ, ∂γ)``;
* :func:`plan` — the call's :class:`~randlora.planner.Route` from the planner (reads grad mode, threads and
  ``torch.compile`` from torch, decides nothing itself);
* :func:`adapter_term` — ``x (W + s·ΔW)ᵀ + b`` (or the adapter's term alone) on the route it is handed;
* :func:`call` — both for one call: the layer hands its call to the core once.

``ad`` is anything with ``randlora_lambda`` ``(r, n)``, ``randlora_gamma`` ``(n, m)`` and ``scaling``
(:class:`randlora.adapter.Adapter`); ``bank`` the model's :class:`randlora.bank.BasisBank`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import offload, planner
from .bank import layer_views
from .errors import StateError
from .ops import acc_dtype, build_weight, randlora_linear, reduce_grads, threads, untracked
from .ops import delta_weight as dense_delta
from .planner import Route
from .recipes import sparsity
from .sparse import sparse_delta, sparse_randlora_linear

__all__ = ["delta_weight", "adapted_weight", "project_grad", "plan", "adapter_term", "call", "views", "density",
           "compute_dtype"]


def density(bank) -> float | None:
    """The ternary bases' density (None: dense bases)."""
    return None if bank.mode == "dense" else 1.0 / sparsity(bank.mode, bank.shape)


def views(bank, O: int, I: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank's views for an ``(O, I)`` weight, ``A`` ``(r, m)`` and ``B_flat`` ``(M, n·r)``, checked to be on
    ``device`` (the adapter's).

    Raises:
        StateError: the bank is on another device.
    """
    A, B = bank.views(O, I)
    copy = offload.bank_copy(bank, device) if A.device != device else None  # (a model accelerate dispatched)
    if copy is not None:
        return layer_views(*copy, O, I, bank.shape.r)
    if A.device != device:
        raise StateError(
            f"the basis bank is on {A.device} but this layer is on {device}: move the whole "
            "model (model.to(...)), which moves the bank registered on its root"
        )
    return A, B


def compute_dtype(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """``(compute dtype, dtype to return in)``: autocast's dtype (returned as computed), else ``dtype`` (returned
    in ``x``'s)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type), None
    return dtype, x.dtype


def delta_weight(ad, bank, O: int, I: int, dtype: torch.dtype) -> torch.Tensor:
    """``s·ΔW`` of adapter ``ad`` for an ``(O, I)`` weight, in ``dtype``, differentiable in ``λ``, ``γ``: through
    ternary bases' non-zeros where the planner finds that build cheaper on this device
    (:func:`randlora.planner.sparse_build_pays`), else through the bases' dense views."""
    lam, gam, s, transposed = ad.randlora_lambda, ad.randlora_gamma, ad.scaling, O < I
    A, B = views(bank, O, I, lam.device)
    if planner.sparse_build_pays(density(bank), A.device.type):
        return sparse_delta(bank.sparse_index(O, I), lam, gam, s, transposed, dtype)
    return dense_delta(lam, gam, A, B, s, transposed, dtype)


def adapted_weight(W: torch.Tensor, ad, bank) -> torch.Tensor:
    """``W + s·ΔW`` (``W`` as ``(O, I)``) in ``W``'s dtype, accumulated in float32 (float64 for float64 weights) as
    :func:`randlora.merge` does, so it equals the merged weight; differentiable in ``λ``, ``γ`` and ``W``."""
    acc = acc_dtype(W.dtype)
    return (W.to(acc) + delta_weight(ad, bank, W.shape[0], W.shape[1], acc)).to(W.dtype)


def project_grad(G: torch.Tensor, ad, bank) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂λ, ∂γ)`` of a loss whose gradient with respect to ``s·ΔW`` is ``G`` (``(O, I)``): ``∂S = B_flatᵀ G``
    (``Gᵀ`` when ``O < I``), reduced against ``A``, ``γ`` and ``λ``. For a layer type that builds ``W + s·ΔW`` and
    receives its weight-shaped gradient (no bases' copy and no ``(O, I)`` temporary is kept for it)."""
    O, I = G.shape
    lam, gam = ad.randlora_lambda, ad.randlora_gamma
    A, B = views(bank, O, I, lam.device)
    acc = torch.promote_types(lam.dtype, torch.float32)
    dS = torch.mm(B.to(acc).t(), G.to(acc).t() if O < I else G.to(acc))
    return reduce_grads(dS, lam, gam, A, ad.scaling, True, True)


def plan(T: int, O: int, I: int, ad, bank, device: str, *, need_x: bool, need_W: bool, with_weight: bool,
         path: str = "auto", keep: str = "auto", cached: bool = False) -> Route:
    """The planner's :class:`~randlora.planner.Route` for a call of ``T`` tokens of adapter ``ad`` on an ``(O, I)``
    weight: :func:`randlora.planner.plan_call` of the call's facts (grad mode, which inputs need gradients, torch's
    threads, ``torch.compile``) and the layer's explicit settings (``path``, ``keep``, ``cached``)."""
    lam, gam = ad.randlora_lambda, ad.randlora_gamma
    d = density(bank)
    return planner.plan_call(
        T=T, O=O, I=I, nr=lam.numel(), r=lam.shape[0], device=device, grad=torch.is_grad_enabled(), need_x=need_x,
        need_S=lam.requires_grad or gam.requires_grad, need_W=need_W, with_weight=with_weight, path=path, keep=keep,
        cached=cached, density=d, threads=threads(device) if d is not None else 1,
        compiling=torch.compiler.is_compiling())


def call(x: torch.Tensor, W: torch.Tensor | None, bias: torch.Tensor | None, ad, bank, O: int, I: int, *,
         need_W: bool, path: str = "auto", keep: str = "auto", cached=None) -> torch.Tensor:
    """One adapted call: :func:`plan` once, :func:`adapter_term` once (``cached``: the layer's kept-weight callable
    inside :func:`randlora.cached`, else None)."""
    route = plan(x.numel() // x.shape[-1], O, I, ad, bank, x.device.type, need_x=x.requires_grad, need_W=need_W,
                 with_weight=W is not None, path=path, keep=keep, cached=cached is not None)
    return adapter_term(x, W, bias, ad, bank, route, O, I, cached)


def adapter_term(x: torch.Tensor, W: torch.Tensor | None, bias: torch.Tensor | None, ad, bank, route: Route,
                 O: int, I: int, cached=None) -> torch.Tensor:
    """``x (W + s·ΔW)ᵀ + b`` of adapter ``ad`` (``W`` None: the adapter's term alone, plus ``bias``) on ``x`` in the
    compute dtype, by ``route``: the sparse op, or the dense op handed the ``W + s·ΔW`` the route says to build
    before it (``route.build``: ``"fresh"``, ``"nonzeros"``, or ``"cached"`` through ``cached(dtype, with_weight)``,
    a callable returning the kept ``W + s·ΔW``, or ``s·ΔW`` alone when ``W`` is None, in a dtype)."""
    lam, gam, s = ad.randlora_lambda, ad.randlora_gamma, ad.scaling
    if route.build == "cached" and untracked(x, W, bias, lam, gam):  # the op's "kept" forward, without its frame
        return F.linear(x, cached(x.dtype, W is not None), bias.to(x.dtype) if bias is not None else None)
    A, B = views(bank, O, I, lam.device)
    if route.kind == "sparse":
        return sparse_randlora_linear(x, W, bias, lam, gam, bank.sparse_index(O, I), s, route)
    prebuilt = None
    if route.build == "fresh":
        prebuilt = build_weight(W, lam, gam, A, B, s, O < I, x.dtype)
    elif route.build == "nonzeros":
        with torch.no_grad():
            prebuilt = sparse_delta(bank.sparse_index(O, I), lam, gam, s, O < I, x.dtype, W)
    elif route.build == "cached":
        prebuilt = cached(x.dtype, W is not None)
    return randlora_linear(x, W, bias, lam, gam, A, B, s, route, prebuilt=prebuilt)
