"""The route planner: every decision about how an adapted layer's call runs, as pure functions returning frozen plans.

A call of an adapted layer is described by its shapes, device type, grad mode, which inputs need gradients,
the layer's explicit settings (``path``, ``keep``) and whether a ``randlora.cached`` block is active.
:func:`plan_call` turns that into a :class:`Route`: dense or sparse, the forward route, whether ``W + s·ΔW``
is built before the op (and kept for backward), the ``∂x`` and ``∂λ/∂γ`` routes, the sparse route's token
block. A layer call inside :func:`randlora.mixed` is planned by :func:`plan_mixed` into a :class:`MixedPlan`:
one pass for the whole batch or one op call per group of rows, which groups use a kept ``W + s·ΔW``, and
which side each group's sparse product takes. The executors (:mod:`randlora.core`, :mod:`randlora.ops`,
:mod:`randlora.sparse`, :mod:`randlora.serving`) run the plan they are given and compute no cost.

Every plan keeps the reasons it was chosen (``why``): ``plan.explain()`` lists each decision with every
candidate it weighed and its predicted cost. The figures come from :mod:`randlora.costs` (multiply-add counts
and the per-device constants, each with the command that measured it). Nothing here imports ``torch``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from .costs import DeviceCosts, backward_costs, device_costs, forward_costs, sparse_costs, token_block

__all__ = [
    "Route",
    "MixedPlan",
    "plan_call",
    "plan_mixed",
    "op_route",
    "sparse_op_route",
    "plan",
    "build_cost",
    "sparse_build_pays",
    "group_cost",
    "work_in_float32",
    "PATHS",
    "KEEP_POLICIES",
    "MIXED_PASSES",
]

PATHS = ("auto", "weight", "activation")
KEEP_POLICIES = ("auto", "always", "never")
MIXED_PASSES = ("auto", "grouped", "batched", "batched-sparse")


# ------------------------------------------------------------------------------------------------
# the route
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    """Every route of one call, decided once (see :func:`plan_call`).

    Attributes:
        kind: ``"dense"`` (``ops.RandLoraFunction``) or ``"sparse"`` (``sparse.SparseRandLoraFunction``).
        forward: ``"weight"`` (build ``W + s·ΔW``, one matmul), ``"activation"`` (``x → S → B``), ``"kept"``
            (one matmul with a ``W + s·ΔW`` built before the op) or ``"sparse"``.
        build: where that prebuilt ``W + s·ΔW`` comes from: None, ``"fresh"`` (built through the bases' dense
            views), ``"nonzeros"`` (through ternary bases' non-zeros, :func:`sparse_build_pays`) or ``"cached"``
            (``s·ΔW`` from the layer's ``randlora.cached`` entry).
        grad_x: ``∂x`` route: None (not needed), ``"kept"``, ``"fused"``, ``"act"`` or ``"sparse"``.
        grad_S: ``∂λ/∂γ`` route: None, ``"G"`` (``B_flatᵀ(gyᵀx)``), ``"act"`` (``(gy B_flat)ᵀx``) or
            ``"sampled"`` (sparse: at ``S``'s pattern).
        grad_W: whether backward computes the frozen weight's gradient.
        block: the sparse route's token block (None: all tokens at once).
        cost: predicted extra multiply-adds over the frozen layer, forward + backward (sparse: weighted).
        why: the decisions that led here, one line each, with the candidates and their predicted costs (not
            part of the route's identity: two routes that run the same way compare equal). :meth:`explain`.
    """

    kind: str
    forward: str
    build: str | None = None
    grad_x: str | None = None
    grad_S: str | None = None
    grad_W: bool = False
    block: int | None = None
    cost: float = 0.0
    why: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def explain(self) -> str:
        """Readable text: the route taken, then each decision the planner made for the call, with every candidate
        it weighed and its predicted cost (extra multiply-adds over the frozen layer, forward + backward; the
        sparse route's weighted by the device's constants), and which bound (memory or cost) decided whether
        ``W + s·ΔW`` is built before the op. ``layer.route(tokens).explain()`` answers "why is this layer slow"."""
        taken = (f"route: {self.kind}, forward {self.forward}"
                 + (f" (with the update prebuilt: {self.build})" if self.build else "")
                 + f", ∂x {self.grad_x or 'not needed'}, ∂λ/∂γ {self.grad_S or 'not needed'}"
                 + (", ∂W" if self.grad_W else "") + (f", token block {self.block}" if self.block else "")
                 + f"; predicted extra cost {self.cost:.3g} multiply-adds")
        return "\n".join([taken, *(f"- {line}" for line in self.why)])

    @property
    def keeps(self) -> tuple[str, ...]:
        """What backward keeps besides the parameters and references to ``W`` and the bases."""
        if self.grad_x is None and self.grad_S is None and not self.grad_W:
            return ()
        return ("x", "W + s·ΔW") if self.build is not None else ("x",)


# ------------------------------------------------------------------------------------------------
# decisions
# ------------------------------------------------------------------------------------------------
def plan(T: int, O: int, I: int, nr: int, *, with_weight: bool = True, path: str = "auto", need_x: bool = True,
         need_S: bool = True, need_W: bool = False, kept: bool = False) -> dict[str, Any]:
    """The dense routes for a call of ``T`` tokens, with their costs (multiply-adds).

    ``kept``: a prebuilt ``W + s·ΔW`` (``s·ΔW`` when ``W`` is not handed to the op) is passed in (forward is then
    one plain matmul with it).
    """
    tr = O < I
    fc = forward_costs(T, O, I, nr, with_weight, kept)
    if kept:
        fwd = "weight"
    else:
        fwd = min(fc, key=fc.__getitem__) if path == "auto" else path
    bc = backward_costs(T, O, I, nr, tr, with_weight, need_x, need_S, need_W, kept)
    if path == "weight":
        bc = {k: v for k, v in bc.items() if k[0] in ("kept", "fused", None) and k[1] in ("G", None)}
    elif path == "activation":
        bc = {k: v for k, v in bc.items() if k[0] in ("act", None) and k[1] in ("act", None)}
    bwd = min(bc, key=bc.__getitem__)
    return {"forward": fwd, "forward_cost": fc[fwd], "backward": bwd, "backward_cost": bc[bwd],
            "base_cost": 2 * T * O * I, "forward_costs": {"weight": fc["weight"]} if kept else fc,
            "backward_costs": bc}


def _keep(T: int, O: int, I: int, nr: int, path: str, policy: str, need_x: bool, need_S: bool, need_W: bool,
          reuse: bool, dc: DeviceCosts, build: float) -> tuple[bool, str]:
    """Whether a training call keeps ``W + s·ΔW`` for backward, and what decided it (setting, memory, cost)."""
    if policy not in KEEP_POLICIES:
        raise ValueError(f"keep must be one of {KEEP_POLICIES}, got {policy!r}")
    if policy == "never" or path == "activation":
        return False, f"keep W + s·ΔW: no (setting: keep={policy!r}, path={path!r})"
    if policy == "always":
        return True, "keep W + s·ΔW: yes (setting: keep='always')"
    ratio = dc.keep_reuse_ratio if reuse else dc.keep_memory_ratio
    if O > ratio * T:
        return False, (f"keep W + s·ΔW: no, by the memory bound (the kept {O}×{I} may be at most {ratio:g}× the "
                       f"saved {T}×{I} input: O <= {ratio:g}·T)")
    a = plan(T, O, I, nr, path=path, need_x=need_x, need_S=need_S, need_W=need_W)
    b = plan(T, O, I, nr, path=path, need_x=need_x, need_S=need_S, need_W=need_W, kept=True)
    build = 0 if reuse else build  # shared by the micro-batches when reused
    kept, plain = b["forward_cost"] + b["backward_cost"] + build, a["forward_cost"] + a["backward_cost"]
    return kept < plain, (f"keep W + s·ΔW: {'yes' if kept < plain else 'no'}, by cost (kept {kept:.3g}"
                          f"{' with the build shared by the cached calls' if reuse else ''} against {plain:.3g}; "
                          f"within the memory bound O <= {ratio:g}·T)")


def build_cost(O: int, I: int, nr: int, density: float | None = None, device: str = "cpu") -> float:
    """What building ``s·ΔW`` (or ``W + s·ΔW``) once costs, in GEMM multiply-adds: ``M·n·r·m`` through the bases'
    dense views, or ``build_weight · M·n·r·m · density`` through ternary bases' non-zeros where that is less
    (:func:`sparse_build_pays`)."""
    full = float(max(O, I) * nr * min(O, I))
    return full * device_costs(device).build_weight * density if sparse_build_pays(density, device) else full


def sparse_build_pays(density: float | None, device: str = "cpu") -> bool:
    """Whether ``s·ΔW`` of ternary bases of ``density`` is built through their non-zeros
    (:func:`randlora.sparse.sparse_delta`) rather than their dense views on ``device``: when ``build_weight ·
    density < 1`` (both builds do ``M·n·r·m`` multiply-adds at full density). False for dense bases (None)."""
    return density is not None and device_costs(device).build_weight * density < 1.0


def _dense_floor(T: int, O: int, I: int, nr: int, with_weight: bool, need_x: bool, need_S: bool,
                 need_W: bool, build: float, dc: DeviceCosts) -> float:
    """The cheapest dense plan's cost (path auto; without and, when ``W`` is given, with a ``W + s·ΔW`` prebuilt at
    ``build``, which a call that needs gradients keeps only within ``keep_memory_ratio``)."""
    p = plan(T, O, I, nr, with_weight=with_weight, need_x=need_x, need_S=need_S, need_W=need_W)
    dense = p["forward_cost"] + p["backward_cost"]
    if with_weight and (not (need_x or need_S or need_W) or O <= dc.keep_memory_ratio * T):
        k = plan(T, O, I, nr, with_weight=True, need_x=need_x, need_S=need_S, need_W=need_W, kept=True)
        dense = min(dense, k["forward_cost"] + k["backward_cost"] + build)
    return dense


# ------------------------------------------------------------------------------------------------
# the planner
# ------------------------------------------------------------------------------------------------
def op_route(T: int, O: int, I: int, nr: int, *, with_weight: bool = True, path: str = "auto", need_x: bool = True,
             need_S: bool = True, need_W: bool = False, kept: bool = False) -> Route:
    """The dense op's :class:`Route` for a direct call of the op (``kept``: a prebuilt ``W + s·ΔW`` is handed
    to it). Layers plan with :func:`plan_call`."""
    return _dense(T, O, I, nr, with_weight, path, need_x, need_S, need_W, kept, None, 0.0)


def sparse_op_route(T: int, device: str = "cpu", threads: int = 1, *, need_x: bool = True, need_S: bool = True,
                    need_W: bool = False) -> Route:
    """The sparse op's :class:`Route` for a direct call of the op. Layers plan with :func:`plan_call`."""
    return _sparse(T, device, threads, need_x, need_S, need_W, 0.0)


def _dense(T: int, O: int, I: int, nr: int, with_weight: bool, path: str, need_x: bool, need_S: bool, need_W: bool,
           kept: bool, build: str | None, build_mac: float, why: tuple[str, ...] = ()) -> Route:
    p = plan(T, O, I, nr, with_weight=with_weight, path=path, need_x=need_x, need_S=need_S, need_W=need_W, kept=kept)
    xr, sr = p["backward"]
    cost = p["forward_cost"] + p["backward_cost"] + (build_mac if build in ("fresh", "nonzeros") else 0)
    fwd = "kept" if kept else p["forward"]
    prebuilt = "W + s·ΔW" if with_weight else "s·ΔW"
    lines = [f"forward: {_candidates(p['forward_costs'], p['forward'])}"
             + (f" (one matmul with the prebuilt {prebuilt})" if kept else "")]
    if need_x or need_S or need_W:
        names = {k: f"∂x {k[0] or '-'} / ∂λ∂γ {k[1] or '-'}" for k in p["backward_costs"]}
        lines.append("backward: " + _candidates({names[k]: v for k, v in p["backward_costs"].items()},
                                                names[p["backward"]]))
    if kept and build in ("fresh", "nonzeros"):
        lines.append(f"building W + s·ΔW ({build}) costs {build_mac:.3g}")
    return Route("dense", fwd, build if kept else None, xr, sr, need_W and with_weight, None, float(cost),
                 (*why, *lines))


def _candidates(costs: dict, chosen) -> str:
    """``a 1.2e+06 (chosen), b 3.4e+06``: each candidate with its cost, the chosen one marked."""
    return ", ".join(f"{k} {v:.3g}{' (chosen)' if k == chosen else ''}" for k, v in costs.items())


def _sparse(T: int, device: str, threads: int, need_x: bool, need_S: bool, need_W: bool, cost: float,
            why: tuple[str, ...] = ()) -> Route:
    """The sparse route; its token block is the device's (one block of all tokens when ``T`` fits in one, or on
    devices without blocking)."""
    c = token_block(device, threads)
    block = c if (c is not None and T > c) else None
    return Route("sparse", "sparse", None, "sparse" if need_x else None, "sampled" if need_S else None, need_W,
                 block, float(cost), why)


def plan_call(*, T: int, O: int, I: int, nr: int, r: int, device: str = "cpu", grad: bool = True,
              need_x: bool = True, need_S: bool = True, need_W: bool = False, with_weight: bool = True,
              path: str = "auto", keep: str = "auto", cached: bool = False, density: float | None = None,
              threads: int = 1, compiling: bool = False) -> Route:
    """Every route of one call of an adapted layer: a pure function of its arguments and of the device's
    :data:`randlora.costs.DEVICE_COSTS` row, memoised on both (a layer called again with the same shape and settings gets the
    same frozen :class:`Route` back; a changed cost row is a new key).

    Args:
        T, O, I: tokens, output and input width. nr, r: ``n·r`` and the rank.
        device: the device type (``"cpu"``, ``"cuda"``, ...): picks the :data:`randlora.costs.DEVICE_COSTS` row.
        grad: grad mode is on. need_x, need_S, need_W: ``x``, ``λ``/``γ``, ``W`` require gradients.
        with_weight: ``W`` is handed to the op (False: the adapter term alone, as under dropout or a quantised base).
        path, keep: the layer's explicit settings (``"sparse"`` forces the sparse route).
        cached: the layer sits inside :func:`randlora.cached` (its ``s·ΔW`` may be reused).
        density: the ternary bases' density (None: dense bases; no sparse route).
        threads: torch's thread count (the CPU's token block and copy weight depend on it).
        compiling: under ``torch.compile`` (no prebuilt ``W + s·ΔW``).
    """
    return _plan_call(device_costs(device), T, O, I, nr, r, device, grad, need_x, need_S, need_W, with_weight, path, keep,
                      cached, density, threads, compiling)


@functools.lru_cache(maxsize=4096)
def _plan_call(costs: DeviceCosts, T: int, O: int, I: int, nr: int, r: int, device: str, grad: bool, need_x: bool,
               need_S: bool, need_W: bool, with_weight: bool, path: str, keep: str, cached: bool, density: float | None,
               threads: int, compiling: bool) -> Route:
    """:func:`plan_call`, memoised (``costs``, the device's row it reads, is part of the key)."""
    need_x, need_S, need_W = grad and need_x, grad and need_S, grad and need_W and with_weight
    density = None if compiling else density  # (under torch.compile nothing is prebuilt)
    build = build_cost(O, I, nr, density, device)
    why = [f"call: {T} tokens, {O}×{I}, n·r = {nr}, {device}, {'grad' if grad else 'no grad'} (needs: "
           f"{', '.join(k for k, v in (('∂x', need_x), ('∂λ/∂γ', need_S), ('∂W', need_W)) if v) or 'none'}), "
           f"path={path!r}, keep={keep!r}{', inside randlora.cached' if cached else ''}"
           f"{f', ternary bases of density {density:.3g}' if density is not None else ''}"]
    if density is not None and path not in ("weight", "activation") and not cached:
        sc = sparse_costs(T, O, I, nr, density, density, need_x=need_x, need_S=need_S, need_W=need_W, r=r,
                          device=device, threads=threads)["total"]
        floor = _dense_floor(T, O, I, nr, with_weight, need_x, need_S, need_W, build, costs)
        why.append(f"sparse route (through the non-zeros, weighted, {threads} thread(s)) {sc:.3g} against the "
                   f"cheapest dense plan's {floor:.3g}: " + ("forced by path='sparse'" if path == "sparse" else
                                                            "sparse" if sc < floor else "dense"))
        if path == "sparse" or sc < floor:
            return _sparse(T, device, threads, need_x, need_S, need_W, sc, tuple(why))
    path = "auto" if path == "sparse" else path
    kept = False
    if with_weight and not compiling:
        if grad:  # (compared on a training call's backward: ∂λ/∂γ needed, W frozen; as keep_pays)
            kept, reason = _keep(T, O, I, nr, path, keep, need_x, True, False, cached, costs, build)
            why.append(reason)
        elif path != "activation":  # a prebuilt W + s·ΔW: the cached one, or one built cheaper than the op's route
            fc = plan(T, O, I, nr, path=path, need_x=False, need_S=False)["forward_cost"]
            kept = cached or build < fc
            why.append("prebuild W + s·ΔW: " + ("yes, from the randlora.cached s·ΔW" if cached else
                                                f"{'yes' if kept else 'no'}, by cost (building {build:.3g} against "
                                                f"the forward route's {fc:.3g})"))
    elif not with_weight:
        why.append("W is not handed to the op (dropout in training, or a quantised base): the adapter term alone")
        if cached and not grad and path != "activation":  # one matmul with the kept s·ΔW, or the op's route
            fc = plan(T, O, I, nr, with_weight=False, path=path, need_x=False, need_S=False)["forward_cost"]
            kept = T * O * I < fc
            why.append(f"use the randlora.cached s·ΔW: {'yes' if kept else 'no'}, by cost (one matmul with it "
                       f"{T * O * I:.3g} against the forward route's {fc:.3g})")
    else:
        why.append("under torch.compile nothing is prebuilt")
    how = "cached" if cached else ("nonzeros" if sparse_build_pays(density, device) else "fresh")
    return _dense(T, O, I, nr, with_weight, path, need_x, need_S, need_W, kept, how if kept else None, build, tuple(why))


# ------------------------------------------------------------------------------------------------
# mixed batches (randlora.mixed)
# ------------------------------------------------------------------------------------------------
def work_in_float32(device: str, itemsize: int) -> bool:
    """Whether sums over ternary bases' non-zeros in a compute dtype of ``itemsize`` bytes run in float32: on the
    CPU for reduced precision, as a GEMM accumulates (the sparse op, and the batched pass of a mixed batch)."""
    return device == "cpu" and itemsize < 4


def group_cost(T: int, O: int, I: int, nr: int, *, density: float | None = None, quantized: bool = False,
               device: str = "cpu", threads: int = 1) -> dict[str, float]:
    """Forward multiply-adds of one group's adapter term on top of the frozen layer, per route.

    ``"activation"``: ``T·nr·(O + I)`` (through the bases); ``"weight"``: build ``W + s·ΔW``
    (:func:`build_cost`: ``M·nr·m``, less through ternary bases' non-zeros), whose one matmul replaces the frozen
    one (a quantized base layer has no float ``W`` to build on: the op builds ``s·ΔW`` through the dense views,
    ``M·nr·m``, and one more matmul ``T·O·I``); ``"kept"``: ``W + s·ΔW`` built earlier and kept (``keep_bytes``),
    whose matmul replaces the group's frozen one: nothing on top (a quantized base layer keeps ``s·ΔW``, whose
    matmul comes on top: ``O·I·(T + gemm_tokens)``); ``"sparse"`` (ternary bases of ``density``): the weighted
    sparse cost with ``threads`` torch threads. The frozen layer's own ``T·O·I`` is not counted.
    """
    c = forward_costs(T, O, I, nr, with_weight=not quantized, kept=True)
    tau = device_costs(device).gemm_tokens
    build = build_cost(O, I, nr, None if quantized else density, device)
    out = {"activation": float(c["activation"]), "weight": c["weight"] + build,
           "kept": float(O * I * (T + tau)) if quantized else 0.0}
    if density is not None:
        out["sparse"] = float(sparse_costs(T, O, I, nr, density, density, need_x=False, need_S=False, need_W=False,
                                           device=device, threads=threads)["forward"])
    return out


@dataclass(frozen=True)
class MixedPlan:
    """How one layer call inside :func:`randlora.mixed` runs (see :func:`plan_mixed`).

    Attributes:
        kind: ``"base"`` (no adapter of the batch is on this layer: the frozen layer for every row), ``"plain"``
            (one adapter on every row and nothing kept: an ordinary call of the layer), ``"grouped"`` (one op
            call per group of rows, each planned by :func:`plan_call` as a batch of its own, and the other rows
            through the frozen layer), ``"batched"`` (the frozen layer once for the batch plus one pass over the
            bases' dense views with per-row ``s·λ``, ``γ``) or ``"batched-sparse"`` (that pass through ternary
            bases' non-zeros).
        keep: the groups whose rows take a kept ``W + s·ΔW`` (built now when the block holds none yet).
        block: the batched sparse pass's token window (None: one window).
        scaled_below: the batched sparse pass computes a group's ``S`` product by scaling its tokens around ``A``
            for a window part of fewer tokens than this (else through the adapter's own ``S``).
        work_float32: the batched pass sums in float32 (reduced precision on the CPU over ternary bases).
        why: the decisions, one line each, with the candidates and their predicted costs (:meth:`explain`).
    """

    kind: str
    keep: tuple[str, ...] = ()
    block: int | None = None
    scaled_below: float = 0.0
    work_float32: bool = False
    why: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def explain(self) -> str:
        """Readable text: how the call runs, then each decision with its candidates and predicted costs."""
        taken = f"mixed call: {self.kind}" + (f", kept W + s·ΔW for {', '.join(self.keep)}" if self.keep else "")
        return "\n".join([taken, *(f"- {line}" for line in self.why)])


@dataclass(frozen=True)
class _Shape:
    """The facts about one adapted layer that a mixed call's decisions read."""

    O: int
    I: int
    n: int
    r: int
    density: float | None
    nnz_A: int
    quantized: bool
    device: str
    threads: int
    path: str
    force: str

    def group(self, T: int) -> dict[str, float]:
        return group_cost(T, self.O, self.I, self.n * self.r, density=self.density, quantized=self.quantized,
                          device=self.device, threads=self.threads)


def plan_mixed(*, groups: tuple[tuple[str, int, bool], ...], T: int, O: int, I: int, n: int, r: int,
               device: str = "cpu", threads: int = 1, density: float | None = None, nnz_A: int = 0,
               quantized: bool = False, path: str = "auto", force: str = "auto", serving: bool = False,
               keep_bytes: int = 0, kept_bytes: int = 0, itemsize: int = 4) -> MixedPlan:
    """How a layer call of ``T`` tokens inside :func:`randlora.mixed` runs: a pure function of its arguments and of
    the device's cost row, memoised.

    Args:
        groups: ``(adapter name, tokens, held)`` for each adapter of the batch that is on this layer, in the
            block's order; ``held``: the block holds a valid kept ``W + s·ΔW`` of it for this layer.
        T: the call's tokens (every row). O, I, n, r: the layer's widths, ``n`` and the rank.
        device, threads: the device type and torch's thread count (the CPU's sparse kernels depend on it).
        density, nnz_A: the ternary bases' density and the non-zeros of the layer's ``A`` view (None, 0: dense).
        quantized: the base layer is quantised (no float ``W`` to build on).
        path: the layer's ``path`` setting (anything but ``"auto"`` runs group by group).
        force: the layer's ``mixed`` setting: ``"auto"``, or one of ``"grouped"``, ``"batched"``,
            ``"batched-sparse"`` (see :func:`randlora.force_route`).
        serving: no gradient is recorded and no adapter drops its input (only then a batched pass or kept
            matrices).
        keep_bytes, kept_bytes: the block's budget for kept matrices and the bytes it holds now.
        itemsize: the compute dtype's bytes per element (a kept ``O × I`` matrix's size; the batched pass over
            ternary bases sums in float32 for reduced precision on the CPU, :func:`work_in_float32`).

    Returns:
        the :class:`MixedPlan`.
    """
    return _plan_mixed(device_costs(device), tuple(groups), T, _Shape(O, I, n, r, density, nnz_A, quantized, device,
                                                                      threads, path, force),
                       serving, keep_bytes, kept_bytes, itemsize)


@functools.lru_cache(maxsize=4096)
def _plan_mixed(dc: DeviceCosts, groups: tuple, T: int, L: _Shape, serving: bool, keep_bytes: int,
                kept_bytes: int, itemsize: int) -> MixedPlan:
    """:func:`plan_mixed`, memoised (``dc``, the device's row it reads, is part of the key)."""
    size = L.O * L.I * itemsize
    why = [f"call: {T} tokens in {len(groups)} group(s) ({', '.join(f'{g[0]} {g[1]}' for g in groups)}), "
           f"{L.O}×{L.I}, {L.device}, {'serving' if serving else 'recording gradients or dropping inputs'}"
           + (f", keep_bytes {keep_bytes} ({kept_bytes} held)" if keep_bytes else "")]
    if not groups:
        return MixedPlan("base", why=(*why, "no adapter of the batch is on this layer"))
    keeping = serving and keep_bytes > 0
    kind = _batched_kind(L, dc, T, groups, why) if keeping else None
    keep = _kept_groups(L, dc, T, groups, kind, keep_bytes, kept_bytes, size, why) if keeping else ()
    rest = tuple(g for g in groups if g[0] not in keep)
    if not keep and len(rest) == 1 and rest[0][1] == T:
        return MixedPlan("plain", why=(*why, f"one adapter ({rest[0][0]}) on every row: an ordinary call"))
    if keep or not keeping:
        kind = _batched_kind(L, dc, T, rest, why) if rest and serving else None
    if kind is None:
        return MixedPlan("grouped", keep, why=tuple(why))
    block = token_block(L.device, L.threads) if kind == "batched-sparse" else None
    below = dc.scaled_side * L.nnz_A / min(L.O, L.I)
    f32 = L.density is not None and work_in_float32(L.device, itemsize)
    return MixedPlan(kind, keep, block, below, f32, tuple(why))


def _batched_kind(L: _Shape, dc: DeviceCosts, T: int, groups: tuple, why: list) -> str | None:
    """``"batched-sparse"`` when each group's cheapest route on its own tokens is the sparse one and no group fills
    the sparse route's token block; else ``"batched"`` when one pass over every row moves fewer values,
    ``2·T·n·m + M·n·r`` (a ``T × n × m`` temporary written and read, the bases read once), than one call per group,
    ``G·(2·n·r·m + M·n·r)``; else None (group by group). The layer's ``mixed`` setting overrides it."""
    if L.force != "auto":
        why.append(f"pass: {L.force} (forced by the layer's mixed setting)")
        return None if L.force == "grouped" else L.force
    if L.path != "auto":
        why.append(f"pass: grouped (the layer's path is {L.path!r})")
        return None
    n, r, m, M = L.n, L.r, min(L.O, L.I), max(L.O, L.I)
    if L.density is not None:
        costs = [L.group(g[1]) for g in groups]
        best = all(c["sparse"] <= min(v for k, v in c.items() if k != "kept") for c in costs)
        block = token_block(L.device, L.threads)
        fits = max(g[1] for g in groups) < (block or T + 1)
        why.append(f"sparse pass: each group's cheapest route is {'' if best else 'not '}the sparse one "
                   f"({'; '.join(_candidates({k: v for k, v in c.items() if k != 'kept'}, None) for c in costs)})"
                   f", largest group {'below' if fits else 'at or above'} the token block {block}")
        if best and fits:
            return "batched-sparse"
    one, each = 2 * T * n * m + M * n * r, len(groups) * (2 * n * r * m + M * n * r)
    why.append(f"dense pass: values moved by one pass {one:.3g} against one call per group {each:.3g}")
    return "batched" if one < each else None


def _kept_groups(L: _Shape, dc: DeviceCosts, T: int, groups: tuple, kind: str | None, keep_bytes: int,
                 kept_bytes: int, size: int, why: list) -> tuple[str, ...]:
    """The groups that take a kept matrix. Group by group (``kind`` None): each whose kept matmul beats its own
    route (:func:`group_cost`), those the block holds, then new ones while the budget allows. With a batched pass:
    every group or none (the pass runs over every row whatever some groups keep), by :func:`_keep_all_pays`."""
    if kind is None:
        want = []
        for name, T_g, held in groups:
            c = L.group(T_g)
            kept = c.pop("kept")
            pays = kept < min(c.values())
            why.append(f"keep {name}: {'yes' if pays else 'no'}, by cost (kept {kept:.3g} against "
                       f"{_candidates(c, None)})")
            if pays:
                want.append((name, held))
        out, held_bytes = [], kept_bytes
        for name, held in want:
            if held or held_bytes + size <= keep_bytes:
                out.append(name)
                held_bytes += 0 if held else size
            else:
                why.append(f"keep {name}: no, by the memory bound ({held_bytes} + {size} > keep_bytes {keep_bytes})")
        return tuple(out)
    new = sum(not g[2] for g in groups)
    if kept_bytes + new * size > keep_bytes:
        why.append(f"keep every group: no, by the memory bound ({kept_bytes} + {new}×{size} > {keep_bytes})")
        return ()
    kept, batched = _keep_all_costs(L, dc, T, groups, kind)
    why.append(f"keep every group: {'yes' if kept < batched else 'no'}, by cost (kept {kept:.3g} against the "
               f"{kind} pass {batched:.3g})")
    return tuple(g[0] for g in groups) if kept < batched else ()


def _keep_all_costs(L: _Shape, dc: DeviceCosts, T: int, groups: tuple, kind: str) -> tuple[float, float]:
    """Every group's kept matmul, ``O·I·(T_g + gemm_tokens)`` each (twice on a quantized base layer: its own forward
    too), gathering and scattering the rows (``T·(I + O)`` values copied, weighed as the sparse route's one-thread
    copies; none when one group holds every row) and each group's ``group_overhead``; against the batched call: the
    frozen matmul ``O·I·(T + gemm_tokens)`` plus the pass, ``T·nr·(O + I)`` through the bases' dense views or the
    groups' sparse costs."""
    O, I, nr, tau = L.O, L.I, L.n * L.r, dc.gemm_tokens
    kept = sum(O * I * (g[1] + tau) for g in groups) * (2 if L.quantized else 1)
    if not (len(groups) == 1 and groups[0][1] == T):
        kept += dc.layout_weight * T * (I + O) + dc.group_overhead * len(groups)
    if kind == "batched-sparse":
        pass_cost = sum(L.group(g[1])["sparse"] for g in groups)
    else:
        pass_cost = T * nr * (O + I)
    return kept, O * I * (T + tau) + pass_cost
