"""Adapted parameters: RandLora on a named 2-D or 3-D ``nn.Parameter`` (``inject(..., target_parameters=[...])``),
such as the fused expert tensors of transformers' mixture-of-experts models (Mixtral, Qwen3-MoE, gpt-oss).

A 3-D tensor ``(E, a, b)`` is ``E`` matrices ``(a, b)``: each expert ``e`` has its own ``λ[e]`` ``(r, n)`` and
``γ[e]`` ``(n, m)``, ``m = min(a, b)``, ``n = ceil(m / r)``, over the model's one shared bank, so every expert's
update is full rank. A 2-D parameter is one matrix (``λ`` ``(r, n)``, ``γ`` ``(n, m)``).

Bank slicing: a matrix ``(a, b)`` reads the bank as a linear layer of weight ``(O, I) = (a, b)`` does,
``A[:, :m]`` and ``B_flat[:M, :n·r]`` (``M = max(a, b)``), with ``ΔW_e = B_flat S_e`` when ``a >= b`` and
``(B_flat S_e)ᵀ`` when ``a < b``: ``B`` always spans the longer side, so the update does not depend on whether
the tensor is stored ``(out, in)`` (Mixtral, Qwen3-MoE) or ``(in, out)`` (gpt-oss); no flag is needed.

Where it acts: the parameter's owning module gets a forward pre-hook that puts ``W + s·ΔW`` (built for every
expert by :class:`_AdaptedWeight`) in place of the Parameter for that call, and an always-called forward hook
that puts the Parameter back. The module's forward reads whatever its attribute holds, so every
``config.experts_implementation`` (``eager``, ``batched_mm``, ``grouped_mm``) computes with the adapted weight.

Memory: :class:`_AdaptedWeight` saves only ``λ``, ``γ`` (the bases and ``W`` are constants, held by
reference); its backward projects the weight-shaped gradient onto them (``∂S_e = B_flatᵀ G_e``, or
``(G_e B_flat)ᵀ``, then :func:`randlora.ops.reduce_grads` once for all experts). While the owner's forward runs,
``torch.autograd.graph.saved_tensors_hooks`` replace every tensor the expert matmuls save that is (a view of)
the built ``W + s·ΔW`` by a recipe, and backward rebuilds it once for that module (dropped after its last
use). So a training step keeps no ``W + s·ΔW`` between layers; within one module's backward it holds one
rebuilt ``W + s·ΔW`` and the weight-shaped gradient flowing into :class:`_AdaptedWeight`.

State: ``<owner>.randlora_params.<name>`` (a :class:`RandLoraParameter`) holds the first adapter's
``randlora_lambda`` ``(E, r, n)`` / ``randlora_gamma`` ``(E, n, m)`` (model ``state_dict`` keys
``<owner>.randlora_params.<name>.randlora_lambda``), further adapters in its ``randlora_extra.<adapter>``; the
parameter itself keeps its name and key. Adapter files name them by the parameter's path:
``<owner>.<name>.randlora_lambda``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import core, planner
from .bank import BasisBank
from .errors import ConfigError, StateError
from .adapter import Adapter, AdapterSlots
from .ops import acc_dtype, reduce_grads, scaled_bases
from .paths import canonical, walk
from .registry import DEFAULT, DEFAULT_INIT, get_init
from .sparse import sparse_delta

__all__ = ["RandLoraParameter", "ExpertAdapter", "PARAMS_ATTR", "attach", "detach", "unit_of", "parameter_units",
           "adapted_parameters", "refuse_parameters", "expert_delta"]

PARAMS_ATTR = "randlora_params"  # the ModuleDict on the owning module holding its adapted parameters
_SWAPPED = "_randlora_swapped"  # owner.__dict__: the Parameters put aside while W + s·ΔW stands in
_HOOKS = "_randlora_saved_hooks"  # owner.__dict__: the saved-tensor hooks entered for this call


def _lead(t: torch.Tensor) -> torch.Tensor:
    """A 2-D matrix (or its λ, γ) as a batch of one; a 3-D tensor as it is."""
    return t if t.dim() == 3 else t.unsqueeze(0)


def _stacked_bases(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``S_e`` of every expert, ``(E, r·n, m)``, by one :func:`randlora.ops.scaled_bases` call: the experts are
    ``E·n`` bases of one layer (``λ`` ``(r, E·n)``, ``γ`` ``(E·n, m)``), ``A`` shared."""
    E, r, n = lam.shape
    S = scaled_bases(lam.transpose(0, 1).reshape(r, E * n), gam.reshape(E * n, -1), A, dtype)
    return S.view(r, E, n, -1).transpose(0, 1).reshape(E, r * n, -1)


_CHUNK = 1 << 24  # elements of float32 temporaries per step of a build (64 MiB), at least one expert's


def _chunks(E: int, per_expert: int) -> list[slice]:
    """Slices of the ``E`` experts, as many per slice as fit :data:`_CHUNK` elements (at least one)."""
    step = max(1, _CHUNK // max(per_expert, 1))
    return [slice(e, min(e + step, E)) for e in range(0, E, step)]


def expert_delta(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, Bf: torch.Tensor, s: float, tr: bool,
                 dtype: torch.dtype, W: torch.Tensor | None = None) -> torch.Tensor:
    """``s·ΔW_e`` (``W_e + s·ΔW_e`` when ``W`` is given) of every expert, ``(E, a, b)`` in ``dtype``.

    Args:
        lam, gam: ``λ`` ``(E, r, n)``, ``γ`` ``(E, n, m)``.
        A, Bf: the bank's views for one ``(a, b)`` matrix (:meth:`BasisBank.views`).
        s: the scale ``alpha / r``.
        tr: ``a < b`` (``ΔW_e = S_eᵀ B_flatᵀ``; else ``B_flat S_e``).
        dtype: the dtype computed and returned in.
        W: the ``(E, a, b)`` weight, or None.

    Returns:
        ``(E, a, b)`` in ``dtype``; equals :func:`randlora.ops.delta_weight` of each expert.
    """
    S = _stacked_bases(lam, gam, A, dtype)
    E, B = S.shape[0], Bf.to(dtype)
    x, y = (S.transpose(1, 2), B.t().expand(E, -1, -1)) if tr else (B.expand(E, -1, -1), S)
    if W is None:
        return torch.bmm(x, y).mul_(s)
    return torch.baddbmm(W.to(dtype), x, y, alpha=s)


class _AdaptedWeight(torch.autograd.Function):
    """``W + s·ΔW`` of every expert from ``(W, λ, γ)``; saves ``λ``, ``γ`` only. Backward: ``∂λ``, ``∂γ`` from the
    weight-shaped gradient (and ``∂W = G`` when ``W`` trains)."""

    @staticmethod
    def forward(ctx, W, lam, gam, unit, s):  # type: ignore[override]
        ctx.save_for_backward(lam, gam)
        ctx.unit, ctx.s = unit, s
        return unit.built(W, lam, gam, s)

    @staticmethod
    def backward(ctx, G):  # type: ignore[override]
        lam, gam = ctx.saved_tensors
        need = ctx.needs_input_grad
        dlam, dgam = ctx.unit.grads(G, lam, gam, ctx.s, need[1], need[2])
        return (G if need[0] else None), dlam, dgam, None, None


class ExpertAdapter(Adapter):
    """One adapter's state on a 3-D parameter: ``λ`` ``(E, r, n)``, ``γ`` ``(E, n, m)`` (``E`` None: a 2-D
    parameter, ``λ`` ``(r, n)``, ``γ`` ``(n, m)``), its scale and ``init``; input dropout does not apply."""

    def __init__(self, E: int | None, r: int, n: int, m: int, *, alpha: float, init: str = DEFAULT_INIT,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        nn.Module.__init__(self)
        self.E = E
        self._declare(r, n, m, alpha=alpha, dropout=0.0, init=init, dtype=dtype, device=device)

    def _declare(self, r, n, m, *, alpha, dropout, init, dtype, device) -> None:  # type: ignore[override]
        get_init(init)
        lead = () if self.E is None else (self.E,)
        self.init, self.r, self.n, self.m = init, int(r), int(n), int(m)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r
        self.randlora_lambda = nn.Parameter(torch.empty(*lead, self.r, self.n, dtype=dtype, device=device))
        self.randlora_gamma = nn.Parameter(torch.empty(*lead, self.n, self.m, dtype=dtype, device=device))
        self.dropout = nn.Identity()
        if not self.randlora_lambda.is_meta:
            self.reset_parameters()

    def extra_repr(self) -> str:
        return f"E={self.E}, " + super().extra_repr()


class RandLoraParameter(ExpertAdapter, AdapterSlots):
    """The adapter on one 2-D or 3-D parameter ``<owner>.<param>``; its own slots hold the first adapter, each
    further one is an :class:`ExpertAdapter` in ``randlora_extra.<name>`` (the layout and bookkeeping of
    :class:`~randlora.adapter.AdapterSlots`, as on an adapted linear layer).

    Args:
        owner: the module holding the parameter (its forward reads it).
        param: the parameter's name in ``owner``.
        bank: the model's :class:`BasisBank`, sized for this parameter's matrices.
        r: rank of each basis.
        alpha: the update's scale is ``alpha / r``.
        init: the starting ``γ`` (a key of :data:`randlora.INITS`).
        name: the first adapter's name.
    """

    _what = "parameter"  # how errors name the holder

    quantized = False
    fan_in_fan_out = False
    bias = None

    def __init__(self, owner: nn.Module, param: str, bank: BasisBank, *, r: int, alpha: float,
                 init: str = DEFAULT_INIT, name: str = DEFAULT) -> None:
        W = owner._parameters[param]
        a, b = W.shape[-2:]
        self.out_features, self.in_features = int(a), int(b)  # the stored orientation, see the module doc
        m = min(a, b)
        super().__init__(int(W.shape[0]) if W.dim() == 3 else None, r, math.ceil(m / int(r)), m, alpha=alpha,
                         init=init, dtype=acc_dtype(W.dtype), device=W.device)
        self.param = param
        self.adapter_name = name
        self.disabled = False
        self.merged_name: str | None = None
        object.__setattr__(self, "_bank", bank)
        object.__setattr__(self, "_owner", owner)

    # -- state ---------------------------------------------------------------------------------
    @property
    def owner(self) -> nn.Module:
        return self._owner

    @property
    def bank(self) -> BasisBank:
        return self._bank

    @property
    def kind(self) -> str:
        """What the report and ``summary`` call it: ``expert tensor`` (3-D) or ``parameter`` (2-D)."""
        return "parameter" if self.E is None else "expert tensor"

    @property
    def weight(self) -> torch.Tensor:
        """The adapted Parameter (also while ``W + s·ΔW`` stands in for it)."""
        put_aside = self._owner.__dict__.get(_SWAPPED, {})
        return put_aside[self.param] if self.param in put_aside else self._owner._parameters[self.param]

    def weight_matrix(self) -> torch.Tensor:
        """The tensor as stored (the orientation every expert's update is built in)."""
        return self.weight

    def add_adapter(self, name: str, *, alpha: float, dropout: float = 0.0,
                    init: str = DEFAULT_INIT) -> ExpertAdapter:
        """Add adapter ``name`` (same bank and ``r``; its own ``λ``, ``γ``, scale, init)."""
        if dropout:
            raise ConfigError(NO_DROPOUT)
        if "randlora_extra" not in self._modules:
            self.randlora_extra = nn.ModuleDict()
        lam = self.randlora_lambda
        ad = ExpertAdapter(self.E, self.r, self.n, self.m, alpha=alpha, init=init, dtype=lam.dtype, device=lam.device)
        self.randlora_extra[name] = ad
        return ad

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank's views for one ``(a, b)`` matrix, ``A`` ``(r, m)`` and ``B_flat`` ``(M, n·r)`` (no copy).

        Raises:
            StateError: the bank is on another device than the parameter.
        """
        return core.views(self._bank, self.out_features, self.in_features, self.weight.device)

    # -- the update ----------------------------------------------------------------------------
    @torch.no_grad()
    def built(self, W: torch.Tensor | None, lam: torch.Tensor, gam: torch.Tensor, s: float,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W + s·ΔW`` (``W`` None: ``s·ΔW``) of every expert, accumulated in float32 (float64 for float64
        weights) and returned in ``dtype`` (default: the weight's), shaped as the parameter. Built a few experts
        at a time (:func:`_chunks`), so the float32 temporaries stay small beside a bf16 tensor. Ternary bases
        build through their non-zeros where that is cheaper on this device, as linear layers do."""
        ref = self.weight
        acc = acc_dtype(ref.dtype)
        A, Bf = self.views()
        lam3, gam3, tr = _lead(lam), _lead(gam), self.out_features < self.in_features
        W3 = None if W is None else _lead(W)
        out = torch.empty(lam3.shape[0], self.out_features, self.in_features, dtype=dtype or ref.dtype,
                          device=A.device)
        sparse = planner.sparse_build_pays(core.density(self._bank), A.device.type)
        idx = self._bank.sparse_index(self.out_features, self.in_features) if sparse else None
        for c in _chunks(out.shape[0], _CHUNK if sparse else out[0].numel()):  # (non-zeros: one expert a step)
            Wc = None if W3 is None else W3[c]
            if sparse:
                out[c] = sparse_delta(idx, lam3[c][0], gam3[c][0], s, tr, acc, None if Wc is None else Wc[0])
            else:
                out[c] = expert_delta(lam3[c], gam3[c], A, Bf, s, tr, acc, Wc)
        return out if ref.dim() == 3 else out[0]

    def grads(self, G: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, s: float, need_lam: bool,
              need_gam: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``∂λ``, ``∂γ`` from ``G = ∂L/∂(W + s·ΔW)``: ``∂S_e = B_flatᵀ G_e`` (``(G_e B_flat)ᵀ`` when ``a < b``),
        reduced by :func:`randlora.ops.reduce_grads` (a few experts at a time, as ``E·n`` bases of one call)."""
        lam3, gam3, G3 = _lead(lam), _lead(gam), _lead(G)
        acc = torch.promote_types(lam.dtype, torch.float32)
        A, Bf = self.views()
        Bc = Bf.to(acc)
        dl, dg = torch.empty_like(lam3), torch.empty_like(gam3)
        r, n = lam3.shape[1:]
        for c in _chunks(G3.shape[0], G3[0].numel()):
            Gc = G3[c].to(acc)
            dS = torch.matmul(Gc, Bc).transpose(1, 2) if self.out_features < self.in_features else torch.matmul(Bc.t(), Gc)
            E = dS.shape[0]
            D = dS.reshape(E, r, n, -1).transpose(0, 1).reshape(r, E * n, -1)
            l, g = reduce_grads(D, lam3[c].transpose(0, 1).reshape(r, E * n), gam3[c].reshape(E * n, -1), A, s,
                                need_lam, need_gam)
            if l is not None:
                dl[c] = l.view(r, E, n).transpose(0, 1)
            if g is not None:
                dg[c] = g.view(E, n, -1)
        return (dl.reshape(lam.shape) if need_lam else None), (dg.reshape(gam.shape) if need_gam else None)

    def adapted(self, ad: Adapter) -> torch.Tensor:
        """``W + s·ΔW`` of adapter ``ad`` in the weight's dtype: through :class:`_AdaptedWeight` when a gradient
        is recorded; else inside :func:`randlora.cached` from its kept tensor (values checked), else built
        directly."""
        W, lam, gam = self.weight, ad.randlora_lambda, ad.randlora_gamma
        if torch.is_grad_enabled() and (lam.requires_grad or gam.requires_grad or W.requires_grad):
            return _AdaptedWeight.apply(W, lam, gam, self, ad.scaling)
        if self._cache is not None:
            return self._cache.weight_of(self, ad, W.dtype)
        return self.built(W, lam.detach(), gam.detach(), ad.scaling)

    def delta_weight(self, dtype: torch.dtype | None = None, name: str | None = None) -> torch.Tensor:
        """``s·ΔW`` of adapter ``name`` (default: the active one), shaped as the parameter, in float32 (float64
        for float64 weights) unless ``dtype``.

        Raises:
            StateError: the parameter has no adapter ``name``.
        """
        ad = self.adapter(name)
        if ad is None:
            raise StateError(f"parameter {self.param!r} has no adapter {name or self.active!r}; it has "
                             f"{self.adapter_names()}")
        return self.delta_of(ad, acc_dtype(self.weight.dtype) if dtype is None else dtype)

    def delta_of(self, ad: Adapter, dtype: torch.dtype) -> torch.Tensor:
        """``s·ΔW`` of adapter ``ad``, shaped as the parameter, in ``dtype``."""
        return self.built(None, ad.randlora_lambda, ad.randlora_gamma, ad.scaling, dtype)

    def call_weight(self) -> tuple[torch.Tensor | None, Adapter | None]:
        """What stands in for the Parameter during a call, and the adapter it applies: ``W + s·ΔW`` of the active
        adapter; the base tensor ``W - s·ΔW`` of a merged one while disabled; ``(None, None)`` when the Parameter
        itself is right (merged, disabled, or the active adapter is not on this parameter)."""
        if self.merged and self.disabled:
            W = self.weight
            acc = acc_dtype(W.dtype)
            return (W.to(acc) - self.delta_weight(acc, self.merged_name)).to(W.dtype), None
        ad = None if (self.disabled or self.merged) else self.adapter()
        return (None, None) if ad is None else (self.adapted(ad), ad)

    # -- merge ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge_(self, name: str | None = None) -> None:
        """Fold ``s·ΔW`` of adapter ``name`` (default: the active one) into the tensor, expert by expert
        (float32 accumulation, cast back to the weight's dtype).

        Raises:
            StateError: already merged, or no adapter ``name`` here.
        """
        if self.merged:
            raise StateError("parameter is already merged; call randlora.unmerge(model) first")
        name = self.active if name is None else name
        self._fold(name, +1.0)
        self.merged_name = name

    def _fold(self, name: str, sign: float) -> None:
        ad = self.adapter(name)
        if ad is None:
            raise StateError(f"parameter {self.param!r} has no adapter {name!r}")
        W = self.weight
        W3, lam3, gam3 = _lead(W), _lead(ad.randlora_lambda), _lead(ad.randlora_gamma)
        acc = acc_dtype(W.dtype)
        for e in range(W3.shape[0]):  # one expert at a time: a float32 copy of one matrix, not of the tensor
            d = self.built(None, lam3[e:e + 1], gam3[e:e + 1], ad.scaling * sign, acc).reshape(W3[e].shape)
            W3[e].copy_((W3[e].to(acc) + d).to(W.dtype))

    def extra_repr(self) -> str:
        return (f"param={self.param!r}, shape={tuple(self.weight.shape)}, " + super().extra_repr()
                + (", merged" if self.merged else "") + (", disabled" if self.disabled else ""))


NO_DROPOUT = ("input dropout cannot apply to an adapted parameter (target_parameters): its update is added to the "
              "weight, which every input of the call shares, so there is no adapter input to drop. Inject with "
              "dropout=0")


# ------------------------------------------------------------------------------------------------
# the owner's hooks: W + s·ΔW stands in for the Parameter during the owner's forward
# ------------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple | None:
    try:
        return t.device, t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, AttributeError):  # no plain storage (nested, sparse, subclasses)
        return None


def _versions(W: torch.Tensor, ad: Adapter) -> tuple[int, int, int]:
    return W._version, ad.randlora_lambda._version, ad.randlora_gamma._version


class _Rebuild:
    """One swapped ``W + s·ΔW`` as the owner's saved tensors hold it: rebuilt in backward on first use, shared by
    every saved view of it, and dropped after the last of them is unpacked."""

    def __init__(self, unit: RandLoraParameter, ad: Adapter, W: torch.Tensor) -> None:
        self.unit, self.ad, self.W = unit, ad, W
        self.versions = _versions(W, ad)
        self.packed = self.unpacked = 0
        self.value: torch.Tensor | None = None

    def pack(self, t: torch.Tensor) -> tuple:
        self.packed += 1
        return self, tuple(t.shape), t.stride(), t.storage_offset()

    def unpack(self, shape: tuple, stride: tuple, offset: int) -> torch.Tensor:
        if self.value is None:
            if _versions(self.W, self.ad) != self.versions:
                raise StateError(f"{self.unit.param!r} or its adapter's λ/γ were modified in place between forward and "
                                 "backward, so backward cannot rebuild the W + s·ΔW forward used. Call backward "
                                 "before optimizer.step() or any in-place change")
            ad = self.ad
            self.value = self.unit.built(self.W, ad.randlora_lambda.detach(), ad.randlora_gamma.detach(), ad.scaling)
        t = self.value.as_strided(shape, stride, offset)
        self.unpacked += 1
        if self.unpacked >= self.packed:
            self.value = None  # the views handed out keep it alive for as long as their nodes run
        return t


def _saved_hooks(rebuilds: dict) -> torch.autograd.graph.saved_tensors_hooks:
    """Saved-tensor hooks that store a recipe for every saved view of a swapped ``W + s·ΔW``."""

    def pack(t: torch.Tensor):
        rb = rebuilds.get(_storage_key(t))
        return t if rb is None else rb.pack(t)

    def unpack(p):
        return p if isinstance(p, torch.Tensor) else p[0].unpack(*p[1:])

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _refuse_mixed(unit: RandLoraParameter) -> None:
    from .serving import inside_mixed  # (serving imports the walker, which imports this module)

    if inside_mixed(unit.bank) and not unit.disabled and not unit.merged:
        raise StateError(f"randlora.mixed cannot give the rows of one batch their own adapters on the adapted parameter "
                         f"{unit.param!r} (target_parameters): its module reads one tensor for the whole batch. Run "
                         "each adapter's rows as a batch of their own (randlora.use(model, name))")


def _swap_in(owner: nn.Module, args) -> None:
    """Pre-hook: every adapted parameter of ``owner`` becomes ``W + s·ΔW`` of the active adapter for this call."""
    units = owner._modules.get(PARAMS_ATTR)
    if units is None or _SWAPPED in owner.__dict__:
        return
    swapped: dict[str, torch.Tensor] = {}
    owner.__dict__[_SWAPPED] = swapped
    rebuilds: dict = {}
    try:
        for pname, unit in units.items():
            _refuse_mixed(unit)
            W = owner._parameters[pname]
            weff, ad = unit.call_weight()
            if weff is None:
                continue
            owner._parameters[pname], swapped[pname] = weff, W
            if ad is not None and torch.is_grad_enabled():  # (also for input gradients alone: not kept either)
                rebuilds[_storage_key(weff)] = _Rebuild(unit, ad, W)
    except BaseException:
        _put_back(owner)
        raise
    if rebuilds:
        hooks = _saved_hooks(rebuilds)
        hooks.__enter__()
        owner.__dict__[_HOOKS] = hooks


def _put_back(owner: nn.Module) -> None:
    for pname, W in owner.__dict__.pop(_SWAPPED, {}).items():
        owner._parameters[pname] = W


def _swap_out(owner: nn.Module, args, output) -> None:
    """Forward hook (also on exceptions): the saved-tensor hooks off, the Parameters back."""
    hooks = owner.__dict__.pop(_HOOKS, None)
    if hooks is not None:
        hooks.__exit__(None, None, None)
    _put_back(owner)


def _set_hooks(owner: nn.Module, want: bool) -> None:
    have = [(d, k) for d in (owner._forward_pre_hooks, owner._forward_hooks) for k, f in d.items()
            if f in (_swap_in, _swap_out)]
    if want and not have:
        owner.register_forward_pre_hook(_swap_in)
        owner.register_forward_hook(_swap_out, always_call=True)
    elif have and not want:
        for d, k in have:
            del d[k]
            owner._forward_hooks_always_called.pop(k, None)


# ------------------------------------------------------------------------------------------------
# where adapted parameters sit
# ------------------------------------------------------------------------------------------------
def attach(owner: nn.Module, unit: RandLoraParameter) -> None:
    """Register ``unit`` as ``owner.randlora_params.<param>`` and install the owner's hooks."""
    if PARAMS_ATTR not in owner._modules:
        owner.add_module(PARAMS_ATTR, nn.ModuleDict())
    owner._modules[PARAMS_ATTR][unit.param] = unit
    _set_hooks(owner, True)


def unit_of(owner: nn.Module, param: str) -> RandLoraParameter | None:
    """The adapter on ``owner``'s parameter ``param``, or None."""
    held = owner._modules.get(PARAMS_ATTR)
    return None if held is None else held._modules.get(param)  # type: ignore[return-value]


def detach(unit: RandLoraParameter) -> None:
    """Take ``unit`` off its owner (the parameter computes as before ``inject``); the hooks go with the last one."""
    owner = unit.owner
    held = owner._modules[PARAMS_ATTR]
    del held[unit.param]
    if len(held) == 0:
        del owner._modules[PARAMS_ATTR]
        _set_hooks(owner, False)


def parameter_units(model: nn.Module):
    """``(real parameter path, unit)`` of every adapted parameter of ``model``, in model order."""
    tail = f"{PARAMS_ATTR}."
    for path, mod in walk(model):
        if isinstance(mod, RandLoraParameter):
            owner = path[: -len(tail + mod.param)].rstrip(".")
            yield (f"{owner}.{mod.param}" if owner else mod.param), mod


def adapted_parameters(model: nn.Module):
    """``(path, unit)`` of every adapted parameter; paths as adapter files name them (without wrapper parts)."""
    for path, unit in parameter_units(model):
        yield canonical(path), unit


def refuse_parameters(model: nn.Module, what: str, why: str) -> None:
    """:class:`StateError` when ``model`` holds adapted parameters and ``what`` cannot carry them.

    Args:
        model: the adapter's root.
        what: the refused call, e.g. ``"randlora.to_lora"``.
        why: the reason, one clause.

    Raises:
        StateError: ``model`` holds adapted parameters (target_parameters).
    """
    found = [p for p, _ in adapted_parameters(model)]
    if found:
        more = f" and {len(found) - 2} more" if len(found) > 2 else ""
        raise StateError(f"{what} cannot write the adapted parameters {found[:2]}{more} (target_parameters): {why}. "
                         "Merge the adapter into the model (randlora.merge), export it as a LoRA peft loads "
                         "(randlora.save_lora), or keep the randlora.save file")
