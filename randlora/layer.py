"""``RandLoraLinear``: the adapted layer that replaces an ``nn.Linear`` (or a GPT-2 style ``Conv1D``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import core
from .adapter import Adapter, AdapterSlots
from .bank import BasisBank
from .errors import StateError
from .ops import acc_dtype
from .planner import Route
from .quantized import forward_quantized, is_quantized, save_quantized
from .registry import DEFAULT, DEFAULT_INIT
from .settings import RouteSettings

__all__ = ["RandLoraLinear"]


class RandLoraLinear(AdapterSlots, RouteSettings):
    """A frozen linear layer plus a RandLora update from shared random bases.

    ``y = x Wᵀ + b + s · dropout(x) ΔWᵀ`` with ``ΔW = Σ_i B_i diag(λ_i) A diag(γ_i)`` (built on the
    ``(I, O)`` side and transposed when ``O < I``), ``s = alpha / r``, ``n = ceil(min(O, I) / r)``,
    ``B_i`` = columns ``i, n+i, …, (r-1)n+i`` of the bank view ``B[:max(O,I), :n, :].reshape(-1, n·r)``
    and ``A`` = the bank's ``A[:, :min(O, I)]``.

    Trainable: ``randlora_lambda`` ``(r, n)`` and ``randlora_gamma`` ``(n, min(O, I))``. Initialised to
    ``λ = 0`` (so the layer starts equal to the base layer) and ``γ = 1 / sqrt(max(n, m))`` (``init="sqrt"``)
    or peft's ``γ = 1 / max(n, m)`` (``init="peft"``).

    Adapters (:class:`~randlora.adapter.AdapterSlots`): the first in the layer's own slots, so a single-adapter
    model's parameters are ``<layer>.randlora_lambda`` / ``.randlora_gamma``; each further one in
    ``randlora_extra.<name>``.

    The base layer's ``weight``/``bias`` Parameters are re-registered here under the same names, so the
    model's ``state_dict`` keys for them do not change; the original module object is kept (unregistered)
    and put back by :func:`randlora.merge` / :func:`randlora.eject`.

    A call asks the planner once (:func:`randlora.core.plan`) and hands the route to one executor
    (:func:`randlora.core.adapter_term`). The route depends only on the call (shapes, dtypes, grad mode) and the
    explicit settings ``path``, ``keep``, ``mixed`` (:func:`randlora.force_route`) and whether the layer sits
    inside :func:`randlora.cached`; nothing computed in one call is reused by another outside that block.

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

    _armed: tuple | None = None  # (kept matrix, bias, quantised) during one call of the model: randlora.cache.arm

    def __init__(self, base: nn.Module, bank: BasisBank, *, r: int, alpha: float, dropout: float = 0.0,
                 fan_in_fan_out: bool = False, init: str = DEFAULT_INIT, name: str = DEFAULT) -> None:
        nn.Module.__init__(self)  # weight and bias first, then the adapter: a plain layer's key order, then λ, γ
        W = base.weight
        self.fan_in_fan_out = bool(fan_in_fan_out) and not is_quantized(base)  # packed storage: the module's shape
        if is_quantized(base):
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
        self._declare_settings()
        self.merged_name: str | None = None  # the adapter folded into the weight, if any
        object.__setattr__(self, "_bank", bank)  # which adapter is active is the bank's registry's to say
        object.__setattr__(self, "_base", base)

    # -- state ---------------------------------------------------------------------------------
    @property
    def bank(self) -> BasisBank:
        return self._bank

    @property
    def base_layer(self) -> nn.Module:
        """The original module (unregistered); its weight/bias are this layer's."""
        return self._base

    @property
    def quantized(self) -> bool:
        """Whether the base is a quantised layer (:func:`randlora.quantized.is_quantized`): its own forward
        computes ``x Wᵀ + b``, and the adapter is added to it; such a layer is never merged in place."""
        return is_quantized(self._base)

    def train(self, mode: bool = True) -> "RandLoraLinear":
        super().train(mode)
        if self.quantized:  # its own forward reads its (unregistered) training flag
            self._base.train(mode)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.quantized:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        save_quantized(self, destination, prefix, keep_vars)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        out = super()._apply(fn, recurse)
        if self._cache is not None:
            self._cache.clear()
        return out

    # -- the weight and the update -----------------------------------------------------------------
    def weight_matrix(self) -> torch.Tensor:
        """The weight as ``(O, I)`` (a transposed view for ``fan_in_fan_out`` layers)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's bank views ``A`` ``(r, m)`` and ``B_flat`` ``(M, n·r)`` (no copy)."""
        return core.views(self._bank, self.out_features, self.in_features, self.randlora_lambda.device)

    def delta_weight(self, dtype: torch.dtype | None = None, name: str | None = None) -> torch.Tensor:
        """``s·ΔW`` of adapter ``name`` (default: the active one) as an ``(O, I)`` tensor, in float32
        (float64 for float64 weights) unless ``dtype``.

        Raises:
            StateError: the layer has no adapter ``name``.
        """
        ad = self.adapter(name)
        if ad is None:
            raise StateError(f"this layer has no adapter {name or self.active!r}; it has {self.adapter_names()}")
        return self.delta_of(ad, acc_dtype(self.weight.dtype) if dtype is None else dtype)

    def delta_of(self, ad: Adapter, dtype: torch.dtype) -> torch.Tensor:
        """``s·ΔW`` of adapter ``ad`` as ``(O, I)`` in ``dtype`` (:func:`randlora.core.delta_weight`)."""
        return core.delta_weight(ad, self._bank, self.out_features, self.in_features, dtype)

    def adapted_weight(self, ad: Adapter) -> torch.Tensor:
        """``W + s·ΔW`` of adapter ``ad`` as ``(O, I)`` in the weight's dtype, equal to the merged weight and
        differentiable in ``λ``, ``γ`` (and ``W``); under ``no_grad`` inside :func:`randlora.cached`, the kept one.
        For parents that read the weight instead of calling the layer (:mod:`randlora.attention`)."""
        W = self.weight_matrix()
        if self._cache is not None and not torch.is_grad_enabled():
            return self._cache.weight_of(self, ad, W.dtype)
        return core.adapted_weight(W, ad, self._bank)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ + b + s · dropout(x) ΔWᵀ`` for the active adapter (:meth:`apply_adapter`); inside
        :func:`randlora.mixed`, each row through its own adapter (the block's plan)."""
        armed = self._armed  # set for one call of the model by randlora.cached(frozen_base=True), values checked
        if armed is not None and armed[0].dtype is x.dtype and not torch.is_grad_enabled() \
                and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling():
            return self._armed_call(x, *armed)
        block = self._bank.mixed_block
        if block is not None:
            return block.forward(self, x)
        return self.own_forward(x)

    def _armed_call(self, x: torch.Tensor, kept: torch.Tensor, bias: torch.Tensor | None, quantized: bool):
        """What :meth:`own_forward` computes, bit for bit, from the kept matrix :func:`randlora.cache.arm` checked: one
        matmul with ``W + s·ΔW``, or on a quantised base its own forward plus one matmul with ``s·ΔW``."""
        if not quantized:
            return F.linear(x, kept, bias)
        y = self._base(x)
        return y + F.linear(x, kept).to(y.dtype)

    def own_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output outside any :func:`randlora.mixed` block."""
        if self.merged and self.disabled and not self.quantized:  # the base layer: take the merged update out
            W, acc = self.weight_matrix(), acc_dtype(self.weight.dtype)
            return F.linear(x, (W.to(acc) - self.delta_weight(acc, self.merged_name)).to(W.dtype), self.bias)
        return self.apply_adapter(x, None if (self.disabled or self.merged) else self.adapter())

    def apply_adapter(self, x: torch.Tensor, ad: Adapter | None) -> torch.Tensor:
        """``x Wᵀ + b + s · dropout(x) ΔWᵀ`` for the adapter ``ad`` (None: the base layer alone), the adapter's part
        by :meth:`term`."""
        if self.quantized:
            return forward_quantized(self, x, ad)
        W = self.weight_matrix()
        if ad is None:  # merged, adapters off, or the active adapter is not on this layer
            return F.linear(x, W, self.bias)
        cd, out_dtype = core.compute_dtype(x, W.dtype)
        if out_dtype is None:  # under autocast: computed in its dtype, outside it
            with torch.autocast(x.device.type, enabled=False):
                return self._adapted(x.to(cd), W, ad, cd)
        return self._adapted(x.to(cd), W, ad, cd).to(out_dtype)

    def _adapted(self, xc: torch.Tensor, W: torch.Tensor, ad: Adapter, cd: torch.dtype) -> torch.Tensor:
        if self.training and ad.drops:  # the frozen term, then the adapter's alone
            b = self.bias.to(cd) if self.bias is not None else None
            return F.linear(xc, W.to(cd), b) + self.term(ad.dropout(xc), None, None, ad)
        return self.term(xc, W, self.bias, ad)

    def term(self, x: torch.Tensor, W: torch.Tensor | None, bias: torch.Tensor | None, ad: Adapter) -> torch.Tensor:
        """``x (W + s·ΔW)ᵀ + b`` of adapter ``ad`` on ``x`` in the compute dtype (``W`` None: its term alone, plus
        ``bias``): :func:`randlora.core.call` plans it once from the call and the layer's explicit settings (``path``,
        ``keep``, whether it sits inside :func:`randlora.cached`), never from earlier calls, so a recomputed forward
        (activation checkpointing) saves exactly what the first one saved; then runs that route once."""
        cached = (lambda cd, w: self._cache.weight_of(self, ad, cd, w)) if self._cache is not None else None
        return core.call(x, W, bias, ad, self._bank, self.out_features, self.in_features,
                         need_W=self.weight.requires_grad, path=self.path, keep=self.keep, cached=cached)

    def route(self, tokens: int, *, need_x: bool = True) -> Route | None:
        """The route a call of ``tokens`` tokens takes now (grad mode, settings and cache as they are; ``need_x``:
        the input requires grad), or None when the call runs no adapter op (merged, disabled, or the active
        adapter is not on this layer). ``layer.route(tokens).explain()`` says why."""
        ad = None if (self.disabled or self.merged) else self.adapter()
        if ad is None:
            return None
        with_weight = not self.quantized and not (self.training and ad.drops)
        return core.plan(tokens, self.out_features, self.in_features, ad, self._bank, ad.randlora_lambda.device.type,
                         need_x=need_x, need_W=self.weight.requires_grad, with_weight=with_weight, path=self.path,
                         keep=self.keep, cached=self._cache is not None)

    # -- merge ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge_(self, name: str | None = None) -> None:
        """Fold ``s·ΔW`` of adapter ``name`` (default: the active one) into the weight (accumulated in float32,
        float64 for float64 weights, cast back to the weight's dtype).

        Raises:
            StateError: already merged, or a quantised base.
        """
        if self.merged:
            raise StateError("layer is already merged; call randlora.unmerge(model) first")
        if self.quantized:
            raise StateError(f"the base is a quantised {type(self._base).__name__}: s·ΔW cannot be folded into its "
                             "weight without re-quantising it; use randlora.merge(model, dequantize=True) for plain "
                             "nn.Linear layers, or keep the adapter unmerged")
        name = self.active if name is None else name
        self._fold(name, 1.0)
        self.merged_name = name

    def _fold(self, name: str, sign: float) -> None:
        """``W ← W ± s·ΔW`` of adapter ``name``, accumulated in float32 (float64 for float64 weights)."""
        W = self.weight_matrix()
        acc = acc_dtype(W.dtype)
        D = self.delta_weight(acc, name)
        W.copy_((W.to(acc) + D if sign > 0 else W.to(acc) - D).to(W.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, n={self.n}, "
                f"scaling={self.scaling:g}, init={self.init}, bias={self.bias is not None}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (", merged" if self.merged else "") + (", disabled" if self.disabled else ""))
