"""``RandLoraLinear``: the adapted layer that replaces an ``nn.Linear`` (or a GPT-2 style ``Conv1D``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .bank import BasisBank
from .errors import ConfigError, StateError
from .registry import DEFAULT, DEFAULT_INIT, INITS, Init, get_init
from . import planner
from .ops import KEEP_POLICIES, PATHS, acc_dtype, build_weight, delta_weight, randlora_linear
from .planner import Route
from .recipes import sparsity
from .sparse import sparse_delta, sparse_randlora_linear

__all__ = ["RandLoraLinear", "Adapter", "is_quantized", "dequantize", "INITS", "DEFAULT_INIT", "Init", "get_init"]


def _is_torchao(W: torch.Tensor) -> bool:
    """A torchao quantised weight (a ``TorchAOBaseTensor`` subclass, e.g. int8 weight-only's ``Int8Tensor``)."""
    return any(c.__name__ == "TorchAOBaseTensor" for c in type(W).__mro__)


def is_quantized(mod: nn.Module) -> bool:
    """Whether ``mod`` is a quantised linear layer that computes its own ``x Wᵀ + b``: bitsandbytes 4-bit
    (``Linear4bit``: a packed ``Params4bit`` weight with a ``quant_state``) or 8-bit (``Linear8bitLt``: an
    int8 ``Int8Params`` weight with ``SCB``), or an ``nn.Linear`` holding a torchao quantised weight tensor.

    Duck typing (neither library is imported): an ``nn.Linear`` whose weight is not floating point and
    carries one of bitsandbytes' attributes, or whose weight's class derives from torchao's
    ``TorchAOBaseTensor``. A plain integer weight is not a quantised layer (nothing says how to read it) and
    stays refused.
    """
    W = getattr(mod, "weight", None)
    if not isinstance(mod, nn.Linear) or not isinstance(W, torch.Tensor):
        return False
    if _is_torchao(W):
        return True
    if W.is_floating_point():
        return False
    return hasattr(W, "quant_state") or hasattr(W, "SCB")


def dequantize(mod: nn.Module) -> torch.Tensor:
    """The float32 ``(O, I)`` weight a quantised layer (see :func:`is_quantized`) computes with.

    Imports bitsandbytes for its layers (only reached for such layers); torchao weights dequantise
    themselves. A fresh tensor; the layer is not changed.

    Raises:
        StateError: the layer has no quantisation state to read (never quantised, or bitsandbytes missing).
    """
    W = mod.weight
    if _is_torchao(W):
        with torch.no_grad():
            return W.dequantize().float()
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:  # the layer exists, so this is a broken install
        raise StateError(f"dequantising a {type(mod).__name__} needs bitsandbytes ({e}); "
                         "pip install bitsandbytes") from None
    if hasattr(W, "quant_state"):
        qs = W.quant_state if W.quant_state is not None else getattr(mod, "quant_state", None)
        if qs is None:
            raise StateError(f"the {type(mod).__name__} has no quant_state: it was never quantised (move it to "
                             "a device first, as bitsandbytes needs)")
        data = W.data
        if getattr(qs, "packing_format_for_cpu", False):
            # bitsandbytes repacks the weight for its CPU kernel on an eval-mode, no-grad call; undo that on
            # copies with its own inverse (the one its state_dict() applies to the layer itself)
            import copy

            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            data, qs = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(qs))
        return bnbf.dequantize_4bit(data, qs).float()
    scb = W.SCB if getattr(W, "SCB", None) is not None else getattr(getattr(mod, "state", None), "SCB", None)
    if scb is None:
        raise StateError(f"the {type(mod).__name__} has no SCB scales: it was never quantised (move it to a device "
                         "first, as bitsandbytes needs)")
    return bnbf.int8_vectorwise_dequant(W.data, scb).float()


class Adapter(nn.Module):
    """One adapter's state on one layer: ``λ`` ``(r, n)``, ``γ`` ``(n, m)``, its scale ``s = alpha / r``, its input
    dropout and the ``init`` it starts from; declared here once for every adapter.

    :class:`RandLoraLinear` is itself an ``Adapter``: its own slots (``randlora_lambda``, ``randlora_gamma``,
    ``scaling``, ``dropout``, ``init``) hold the layer's first adapter, and each further adapter is an
    ``Adapter`` in ``layer.randlora_extra[name]``. ``layer.adapter(name)`` returns either the same way, so the
    code that computes, merges, saves or deletes an adapter never asks where it is held.

    ``reset_parameters`` writes the start (``λ = 0`` and ``γ`` as ``init`` says); ``to_empty`` after a meta-device
    construction calls it, so the adapter starts from its initial state, not from garbage.
    """

    def __init__(self, r: int, n: int, m: int, *, alpha: float, dropout: float = 0.0, init: str = DEFAULT_INIT,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self._declare(r, n, m, alpha=alpha, dropout=dropout, init=init, dtype=dtype, device=device)

    def _declare(self, r: int, n: int, m: int, *, alpha: float, dropout: float, init: str, dtype: torch.dtype,
                 device) -> None:
        """Create the adapter's state (the one place it is declared) and write its start (unless on meta)."""
        get_init(init)
        self.init = init
        self.r, self.n, self.m = int(r), int(n), int(m)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r
        self.randlora_lambda = nn.Parameter(torch.empty(self.r, self.n, dtype=dtype, device=device))
        self.randlora_gamma = nn.Parameter(torch.empty(self.n, self.m, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if not self.randlora_lambda.is_meta:
            self.reset_parameters()

    def _adopt(self, other: "Adapter") -> None:
        """Hold ``other``'s state in this adapter's slots (the same Parameter and dropout objects)."""
        self.init, self.alpha, self.scaling = other.init, other.alpha, other.scaling
        self.randlora_lambda, self.randlora_gamma = other.randlora_lambda, other.randlora_gamma
        self.dropout = other.dropout

    @property
    def drops(self) -> bool:
        """Whether the adapter has input dropout (it then changes training calls only)."""
        return isinstance(self.dropout, nn.Dropout)

    def reset_parameters(self) -> None:
        """``λ = 0`` and ``γ`` as ``init`` says: the update starts at zero."""
        with torch.no_grad():
            self.randlora_lambda.zero_()
            self.randlora_gamma.fill_(get_init(self.init).gamma(self.n, self.m))

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        was_meta = self.randlora_lambda.is_meta
        out = super()._apply(fn, recurse)
        if was_meta and not self.randlora_lambda.is_meta:
            self.reset_parameters()  # to_empty: start from the initial state, not garbage
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, n={self.n}, m={self.m}, scaling={self.scaling:g}, init={self.init}"


class RandLoraLinear(Adapter):
    """A frozen linear layer plus a RandLora update from shared random bases.

    ``y = x Wᵀ + b + s · dropout(x) ΔWᵀ`` with ``ΔW = Σ_i B_i diag(λ_i) A diag(γ_i)`` (built on the
    ``(I, O)`` side and transposed when ``O < I``), ``s = alpha / r``, ``n = ceil(min(O, I) / r)``,
    ``B_i`` = columns ``i, n+i, …, (r-1)n+i`` of the bank view ``B[:max(O,I), :n, :].reshape(-1, n·r)``
    and ``A`` = the bank's ``A[:, :min(O, I)]``.

    Trainable: ``randlora_lambda`` ``(r, n)`` and ``randlora_gamma`` ``(n, min(O, I))``. Initialised to
    ``λ = 0`` (so the layer starts equal to the base layer) and ``γ = 1 / sqrt(max(n, m))`` (``init="sqrt"``)
    or peft's ``γ = 1 / max(n, m)`` (``init="peft"``).

    Adapters: the layer is an :class:`Adapter` whose own slots hold its first adapter (``adapter_name``), so a
    single-adapter model's parameters are ``<layer>.randlora_lambda`` / ``.randlora_gamma``; each further
    adapter is an :class:`Adapter` in ``randlora_extra.<name>``. These names are what ``state_dict``,
    ``named_parameters`` (DDP, FSDP2, DeepSpeed) and saved full-model state dicts see, and they do not depend on
    how many adapters were added later. Everything else reads an adapter through :meth:`adapter` and treats
    every one the same; only :meth:`add_adapter` and :meth:`remove_adapter` know where each is held. Removing
    the first adapter moves the next one (in the order they were added) into the layer's slots, the same
    Parameter objects, so the layer is then laid out as if that one had been added first.

    The base layer's ``weight``/``bias`` Parameters are re-registered here under the same names, so the
    model's ``state_dict`` keys for them do not change; the original module object is kept (unregistered)
    and put back by :func:`randlora.merge` / :func:`randlora.eject`.

    The route a call takes depends only on the call (shapes, dtypes, grad mode) and the explicit settings
    ``path``, ``keep`` and whether the layer sits inside :func:`randlora.cached`; nothing computed in one
    call is reused by another outside that block.

    Args:
        base: the ``nn.Linear`` (or ``Conv1D``) to adapt; its weight becomes this layer's (frozen by
            :func:`randlora.inject`, not here).
        bank: the model's :class:`BasisBank`, sized for this layer.
        r: rank of each basis (the bank's ``r``).
        alpha: the update's scale is ``alpha / r``.
        dropout: dropout probability on the adapter's input (training only).
        fan_in_fan_out: the weight is stored ``(in, out)`` (GPT-2 ``Conv1D``).
        init: the starting ``γ``, a key of :data:`INITS` (``reset_parameters`` and ``to_empty`` use it).
        name: the name of this first adapter (the model's registry lists it).
    """

    def __init__(
        self,
        base: nn.Module,
        bank: BasisBank,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        init: str = DEFAULT_INIT,
        name: str = DEFAULT,
    ) -> None:
        nn.Module.__init__(self)  # weight and bias first, then the adapter: a plain layer's key order, then λ, γ
        W = base.weight
        self.fan_in_fan_out = bool(fan_in_fan_out)
        if is_quantized(base):  # packed storage: the shape is the module's
            self.fan_in_fan_out = False
            self.out_features, self.in_features = int(base.out_features), int(base.in_features)
        else:
            self.out_features, self.in_features = (W.shape[1], W.shape[0]) if fan_in_fan_out else tuple(W.shape)
        O, I = self.out_features, self.in_features
        self.M = max(O, I)
        self.weight = W
        self.bias = getattr(base, "bias", None)
        self._declare(r, math.ceil(min(O, I) / int(r)), min(O, I), alpha=alpha, dropout=dropout, init=init,
                      dtype=acc_dtype(W.dtype), device=W.device)
        self.adapter_name = name
        """The adapter held in this layer's own slots."""
        # explicit settings (the op's route is a function of these and of each call, nothing else)
        self.disabled = False
        self.path = "auto"  # "auto" (cost model) | "weight" | "activation"
        self.keep = "auto"  # keep W + s·ΔW from forward for backward: "auto" (cost model) | "always" | "never"
        self.merged_name: str | None = None  # the adapter folded into the weight, if any
        # which adapter is active is the model's registry's to say (the bank holds it)
        object.__setattr__(self, "_bank", bank)
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_delta_cache", None)  # a DeltaCache while inside randlora.cached(...)

    # -- state ---------------------------------------------------------------------------------
    @property
    def bank(self) -> BasisBank:
        return self._bank

    @property
    def merged(self) -> bool:
        """Whether an adapter's ``s·ΔW`` is folded into the weight (see :meth:`merge_`)."""
        return self.merged_name is not None

    @property
    def active(self) -> str:
        """The model's active adapter (its registry is the one source of truth)."""
        reg = self._bank.registry
        return reg.active if reg is not None else DEFAULT

    @property
    def base_layer(self) -> nn.Module:
        """The original module (unregistered); its weight/bias are this layer's."""
        return self._base

    @property
    def quantized(self) -> bool:
        """Whether the base is a quantised layer (see :func:`is_quantized`): its own forward
        computes ``x Wᵀ + b``, and the adapter is added to it; such a layer is never merged in place."""
        return is_quantized(self._base)

    def train(self, mode: bool = True) -> "RandLoraLinear":
        # a quantised base runs its own forward, which reads its (unregistered) training flag
        super().train(mode)
        if self.quantized:
            self._base.train(mode)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.quantized:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        # weight, bias and the quantisation state (absmax, quant_map, SCB, ...) exactly as the base saves them
        self._base._save_to_state_dict(destination, prefix, keep_vars)
        for k, p in self._parameters.items():
            if k not in ("weight", "bias") and p is not None:
                destination[prefix + k] = p if keep_vars else p.detach()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        out = super()._apply(fn, recurse)
        if self._delta_cache is not None:
            self._delta_cache.clear()
        return out

    def set_path(self, path: str) -> None:
        """Force the op's path: ``"auto"`` (cost model), ``"weight"``, ``"activation"`` or, for ternary bases
        (``bases="sparse"``/``"very_sparse"``), ``"sparse"`` (only the bases' non-zeros are touched).

        Raises:
            ConfigError: ``path`` is not one of those, or ``"sparse"`` on dense bases.
        """
        if path not in PATHS + ("sparse",):
            raise ConfigError(f"path must be one of {PATHS + ('sparse',)}, got {path!r}")
        if path == "sparse" and self._bank.mode == "dense":
            raise ConfigError("path 'sparse' needs ternary bases; inject with bases='sparse' or bases='very_sparse'")
        self.path = path

    def set_keep(self, keep: str) -> None:
        """Whether a training call builds ``W + s·ΔW`` in forward and keeps it for backward: ``"auto"`` (when
        that saves multiply-adds and it is no larger than the saved input, see :func:`randlora.ops.keep_pays`),
        ``"always"`` or ``"never"``. The choice is made afresh for every call.

        Raises:
            ConfigError: ``keep`` is not one of those.
        """
        if keep not in KEEP_POLICIES:
            raise ConfigError(f"keep must be one of {KEEP_POLICIES}, got {keep!r}")
        self.keep = keep

    # -- adapters ------------------------------------------------------------------------------
    def adapter(self, name: str | None = None) -> Adapter | None:
        """Adapter ``name`` (default: the active one) on this layer, or None when the layer lacks it."""
        name = self.active if name is None else name
        if name == self.adapter_name:
            return self
        extra = self._modules.get("randlora_extra")
        return extra._modules.get(name) if extra is not None else None  # type: ignore[return-value]

    def adapters(self) -> dict[str, Adapter]:
        """Every adapter on this layer by name, in the order they were added."""
        extra = self._modules.get("randlora_extra")
        return {self.adapter_name: self, **(extra._modules if extra is not None else {})}  # type: ignore[dict-item]

    def adapter_names(self) -> list[str]:
        """The adapters on this layer, in the order they were added."""
        return list(self.adapters())

    def add_adapter(self, name: str, *, alpha: float, dropout: float = 0.0, init: str = DEFAULT_INIT) -> Adapter:
        """Add adapter ``name`` on this layer (same bank and ``r``; its own ``λ``, ``γ``, scale, dropout, init)."""
        if "randlora_extra" not in self._modules:
            self.randlora_extra = nn.ModuleDict()
        lam = self.randlora_lambda
        ad = Adapter(self.r, self.n, self.m, alpha=alpha, dropout=dropout, init=init, dtype=lam.dtype,
                     device=lam.device)
        self.randlora_extra[name] = ad
        return ad

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` from this layer. When it is the one in the layer's own slots, the next adapter
        moves into them (the same Parameter objects; its keys become ``randlora_lambda`` / ``randlora_gamma``).

        Raises:
            StateError: the layer lacks ``name``, or it is its only adapter (eject or unwrap the layer instead).
        """
        names = self.adapter_names()
        if name not in names or len(names) == 1:
            raise StateError(f"cannot remove adapter {name!r} from a layer holding {names}: a layer keeps at least "
                             "one adapter; remove the layer's wrapper instead (randlora.delete does)")
        extra = self.randlora_extra
        if name == self.adapter_name:
            name = names[1]
            self._adopt(extra[name])
            self.adapter_name = name
        del extra[name]
        if len(extra) == 0:
            del self.randlora_extra

    def _w(self) -> torch.Tensor:
        """The weight as ``(O, I)`` (a transposed view for ``fan_in_fan_out`` layers)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self._bank.views(self.out_features, self.in_features)
        if A.device != self.weight.device:
            raise StateError(
                f"the basis bank is on {A.device} but this layer is on {self.weight.device}: move the whole "
                "model (model.to(...)), which moves the bank registered on its root"
            )
        return A, B

    def delta_weight(self, dtype: torch.dtype | None = None, name: str | None = None) -> torch.Tensor:
        """``s·ΔW`` of adapter ``name`` (default: the active one) as an ``(O, I)`` tensor, in float32
        (float64 for float64 weights) unless ``dtype``."""
        if dtype is None:
            dtype = acc_dtype(self.weight.dtype)
        ad = self.adapter(name)
        if ad is None:
            raise StateError(f"this layer has no adapter {name or self.active!r}; it has {self.adapter_names()}")
        return self._delta(ad, dtype)

    def _density(self) -> float | None:
        """The ternary bases' density (None: dense bases)."""
        bank = self._bank
        return None if bank.mode == "dense" else 1.0 / sparsity(bank.mode, bank.shape)

    def _delta(self, ad: Adapter, dtype: torch.dtype) -> torch.Tensor:
        """``s·ΔW`` of ``ad`` in ``dtype``: through ternary bases' non-zeros where that is the cheaper build on this
        device (:func:`randlora.planner.sparse_build_pays`), else through the bases' dense views."""
        lam, gam, s, tr = ad.randlora_lambda, ad.randlora_gamma, ad.scaling, self.out_features < self.in_features
        A, B = self._views()  # (also the device check)
        if planner.sparse_build_pays(self._density(), A.device.type):
            idx = self._bank.sparse_index(self.out_features, self.in_features)
            return sparse_delta(idx, lam, gam, s, tr, dtype)
        return delta_weight(lam, gam, A, B, s, tr, dtype)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ + b + s · dropout(x) ΔWᵀ`` for the active adapter (:meth:`apply_adapter`)."""
        if self.merged and self.disabled and not self.quantized:  # the base layer: take the merged update out
            W, acc = self._w(), acc_dtype(self.weight.dtype)
            return F.linear(x, (W.to(acc) - self.delta_weight(acc, self.merged_name)).to(W.dtype), self.bias)
        return self.apply_adapter(x, None if (self.disabled or self.merged) else self.adapter())

    def apply_adapter(self, x: torch.Tensor, ad: "Adapter | None") -> torch.Tensor:
        """``x Wᵀ + b + s · dropout(x) ΔWᵀ`` for the adapter ``ad`` (:meth:`adapter`; None: the base layer alone),
        by one planned op call (:meth:`_op`). :func:`randlora.mixed` calls it once per group of rows."""
        if self.quantized:
            return self._forward_quantized(x, ad)
        W = self._w()
        if ad is None:  # merged, adapters off, or the active adapter is not on this layer
            return F.linear(x, W, self.bias)
        cd, out_dtype = self._compute_dtype(x, W.dtype)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(cd)
            if self.training and ad.drops:  # the frozen term, then the adapter's alone
                b = self.bias.to(cd) if self.bias is not None else None
                y = F.linear(xc, W.to(cd), b) + self._op(ad.dropout(xc), None, None, ad)
            else:
                y = self._op(xc, W, self.bias, ad)
        return y if out_dtype is None else y.to(out_dtype)

    def _forward_quantized(self, x: torch.Tensor, ad: "Adapter | None") -> torch.Tensor:
        """``base_layer(x) + s · dropout(x) ΔWᵀ``: the base's own forward (its own saved tensors), the adapter
        term from the op with ``W = None`` (it keeps only ``x``, ``λ``, ``γ``)."""
        y = self._base(x)
        if ad is None:
            return y
        cd, _ = self._compute_dtype(x, x.dtype if x.is_floating_point() else ad.randlora_lambda.dtype)
        with torch.autocast(x.device.type, enabled=False):
            d = self._op(ad.dropout(x.to(cd)), None, None, ad)
        return y + d.to(y.dtype)

    @staticmethod
    def _compute_dtype(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
        """``(compute dtype, dtype to return in)``: autocast's dtype (returned as computed), else ``dtype``
        (returned in ``x``'s)."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type), None
        return dtype, x.dtype

    def _op(self, x: torch.Tensor, W: torch.Tensor | None, bias: torch.Tensor | None, ad: Adapter) -> torch.Tensor:
        """``x (W + s·ΔW)ᵀ + b`` of adapter ``ad`` (``W`` None: the adapter term alone) on ``x`` in the compute
        dtype, by the route the planner gives this call (planned here, once; the ops only read it)."""
        lam, gam, s = ad.randlora_lambda, ad.randlora_gamma, ad.scaling
        route = self._plan(x.numel() // x.shape[-1], x.requires_grad, W is not None, ad, x.device.type)
        A, B = self._views()  # (also the device check)
        if route.kind == "sparse":
            idx = self._bank.sparse_index(self.out_features, self.in_features)
            return sparse_randlora_linear(x, W, bias, lam, gam, idx, s, route)
        weff = self._weff(route, ad, x.dtype, A, B)
        return randlora_linear(x, W, bias, lam, gam, A, B, s, route, weff=weff)

    def _plan(self, T: int, need_x: bool, fused: bool, ad: Adapter, device: str) -> Route:
        """The planner's :class:`~randlora.planner.Route` for a call of ``T`` tokens: a pure function of the
        call (shapes, device type, grad mode, which inputs need gradients) and of the explicit settings
        (``path``, ``keep``, whether the layer sits inside :func:`randlora.cached`). Never of earlier calls, so
        a recomputed forward (activation checkpointing) saves exactly what the first one saved."""
        density = self._density()
        lam, gam = ad.randlora_lambda, ad.randlora_gamma
        return planner.plan_call(
            T=T, O=self.out_features, I=self.in_features, nr=lam.numel(), r=self.r, device=device,
            grad=torch.is_grad_enabled(), need_x=need_x, need_S=lam.requires_grad or gam.requires_grad,
            need_W=self.weight.requires_grad, fused=fused, path=self.path, keep=self.keep,
            cached=self._delta_cache is not None,
            density=density, threads=torch.get_num_threads() if (density is not None and device == "cpu") else 1,
            compiling=torch.compiler.is_compiling())

    def _weff(self, route: Route, ad: Adapter, cd: torch.dtype, A: torch.Tensor,
              B: torch.Tensor) -> torch.Tensor | None:
        """The prebuilt ``W + s·ΔW`` of ``ad`` in ``cd`` the route hands the op (``route.build``), or None."""
        if route.build is None:
            return None
        lam, gam, s = ad.randlora_lambda, ad.randlora_gamma, ad.scaling
        tr = self.out_features < self.in_features
        if route.build == "fresh":
            return build_weight(self._w(), lam, gam, A, B, s, tr, cd)
        if route.build == "sparse":
            with torch.no_grad():
                idx = self._bank.sparse_index(self.out_features, self.in_features)
                return sparse_delta(idx, lam, gam, s, tr, cd, self._w())
        return self._cached_weight(ad, cd)

    def _cached_weight(self, ad: Adapter, cd: torch.dtype) -> torch.Tensor:
        """``W + s·ΔW`` of ``ad`` in ``cd`` through the layer's :class:`~randlora.cache.DeltaCache` (no gradient)."""
        bank, acc = self._bank, acc_dtype(self.weight.dtype)
        return self._delta_cache.weight(self.weight, self._w(), cd, ad.randlora_lambda, ad.randlora_gamma,
                                        ad.scaling, (bank.A, bank.B, bank.generation), lambda: self._delta(ad, acc))

    def adapted_weight(self, ad: Adapter) -> torch.Tensor:
        """``W + s·ΔW`` of adapter ``ad`` as ``(O, I)`` in the weight's dtype, accumulated as :meth:`merge_` does
        (so it equals the merged weight) and differentiable in ``λ``, ``γ`` (and ``W``); under ``no_grad``
        inside :func:`randlora.cached`, through the layer's cache (:meth:`_cached_weight`). For parents that read the weight instead of
        calling the layer (:mod:`randlora.attention`)."""
        W = self._w()
        if self._delta_cache is not None and not torch.is_grad_enabled():
            return self._cached_weight(ad, W.dtype)
        acc = acc_dtype(W.dtype)
        return (W.to(acc) + self._delta(ad, acc)).to(W.dtype)

    def _prebuilt(self, ad: Adapter, cd: torch.dtype, T: int, need_x: bool) -> torch.Tensor | None:
        """The ``W + s·ΔW`` of ``ad`` a call of ``T`` tokens (with ``W``) would hand the op, or None."""
        if self.quantized:  # no float W to build on
            return None
        route = self._plan(T, need_x, True, ad, self.weight.device.type)
        return self._weff(route, ad, cd, *self._views())

    def route(self, tokens: int, *, need_x: bool = True) -> Route | None:
        """The routes a call of ``tokens`` tokens takes now (grad mode, settings and cache as they are; ``need_x``:
        the input requires grad): the planner's :class:`~randlora.planner.Route`, or None when the call runs no
        adapter op (merged, disabled, or the active adapter is not on this layer)."""
        ad = None if (self.disabled or self.merged) else self.adapter()
        if ad is None:
            return None
        fused = not self.quantized and not (self.training and ad.drops)
        return self._plan(tokens, need_x, fused, ad, self.weight.device.type)

    def set_cache(self, cache: "DeltaCache | None") -> "DeltaCache | None":
        """Install ``cache`` (a :class:`randlora.cache.DeltaCache`, or None) as this layer's kept ``s·ΔW``;
        returns the previous one. Used by :func:`randlora.cached`."""
        prev = self._delta_cache
        object.__setattr__(self, "_delta_cache", cache)
        return prev

    # -- merge ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge_(self, safe: bool = False, name: str | None = None) -> None:
        """Fold ``s·ΔW`` of adapter ``name`` (default: the active one) into the weight (accumulated in
        float32, cast back to the weight's dtype)."""
        if self.merged:
            raise StateError("layer is already merged; call randlora.unmerge(model) first")
        if self.quantized:
            raise StateError(f"the base is a quantised {type(self._base).__name__}: s·ΔW cannot be folded into its "
                             "weight without re-quantising it; use randlora.merge(model, dequantize=True) for plain "
                             "nn.Linear layers, or keep the adapter unmerged")
        W = self._w()
        acc = acc_dtype(W.dtype)
        name = self.active if name is None else name
        new = W.to(acc) + self.delta_weight(acc, name)
        if safe and not torch.isfinite(new).all():
            raise StateError("merging would make the weight non-finite")
        W.copy_(new.to(W.dtype))
        self.merged_name = name

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Subtract ``s·ΔW`` from the weight again."""
        if not self.merged:
            raise StateError("layer is not merged; nothing to unmerge")
        W = self._w()
        acc = acc_dtype(W.dtype)
        W.copy_((W.to(acc) - self.delta_weight(acc, self.merged_name)).to(W.dtype))
        self.merged_name = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, n={self.n}, "
                f"scaling={self.scaling:g}, init={self.init}, bias={self.bias is not None}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (", merged" if self.merged else "") + (", disabled" if self.disabled else ""))
