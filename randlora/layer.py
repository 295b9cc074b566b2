"""``RandLoraLinear``: the adapted layer that replaces an ``nn.Linear`` (or a GPT-2 style ``Conv1D``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .bank import BasisBank
from .errors import ConfigError, StateError
from .ops import PATHS, delta_weight, randlora_linear

__all__ = ["RandLoraLinear"]


class RandLoraLinear(nn.Module):
    """A frozen linear layer plus a RandLora update from shared random bases.

    ``y = x Wᵀ + b + s · dropout(x) ΔWᵀ`` with ``ΔW = Σ_i B_i diag(λ_i) A diag(γ_i)`` (built on the
    ``(I, O)`` side and transposed when ``O < I``), ``s = alpha / r``, ``n = ceil(min(O, I) / r)``,
    ``B_i`` = columns ``i, n+i, …, (r-1)n+i`` of the bank view ``B[:max(O,I), :n, :].reshape(-1, n·r)``
    and ``A`` = the bank's ``A[:, :min(O, I)]``.

    Trainable: ``randlora_lambda`` ``(r, n)`` and ``randlora_gamma`` ``(n, min(O, I))``. Initialised to
    ``λ = 0``, ``γ = 1 / max(n, m)`` so the layer starts equal to the base layer.

    The base layer's ``weight``/``bias`` Parameters are re-registered here under the same names, so the
    model's ``state_dict`` keys for them do not change; the original module object is kept (unregistered)
    and put back by :func:`randlora.merge` / :func:`randlora.eject`.
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
    ) -> None:
        super().__init__()
        W = base.weight
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.out_features, self.in_features = (W.shape[1], W.shape[0]) if fan_in_fan_out else tuple(W.shape)
        self.r = int(r)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r
        O, I = self.out_features, self.in_features
        self.m, self.M = min(O, I), max(O, I)
        self.n = math.ceil(self.m / self.r)
        self.weight = W
        self.bias = getattr(base, "bias", None)
        pdtype = torch.float64 if W.dtype == torch.float64 else torch.float32
        self.randlora_lambda = nn.Parameter(torch.empty(self.r, self.n, dtype=pdtype, device=W.device))
        self.randlora_gamma = nn.Parameter(torch.empty(self.n, self.m, dtype=pdtype, device=W.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.merged = False
        self.path = "auto"
        object.__setattr__(self, "_bank", bank)
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_cache", None)
        if not W.is_meta:
            self.reset_parameters()

    # -- state ---------------------------------------------------------------------------------
    @property
    def bank(self) -> BasisBank:
        return self._bank

    @property
    def base_layer(self) -> nn.Module:
        """The original module (unregistered); its weight/bias are this layer's."""
        return self._base

    def reset_parameters(self) -> None:
        """``λ = 0``, ``γ = 1 / max(n, m)``: the update starts at zero."""
        with torch.no_grad():
            self.randlora_lambda.zero_()
            self.randlora_gamma.fill_(1.0 / max(self.n, self.m))
        self._cache = None

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        was_meta = self.randlora_lambda.is_meta
        out = super()._apply(fn, recurse)
        self._cache = None
        if was_meta and not self.randlora_lambda.is_meta:
            self.reset_parameters()  # to_empty: start from the initial state, not garbage
        return out

    def train(self, mode: bool = True) -> "RandLoraLinear":
        self._cache = None
        return super().train(mode)

    def set_path(self, path: str) -> None:
        """Force the op's path: ``"auto"`` (cost model), ``"weight"`` or ``"activation"``."""
        if path not in PATHS:
            raise ConfigError(f"path must be one of {PATHS}, got {path!r}")
        self.path = path

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

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``s·ΔW`` as an ``(O, I)`` tensor, in float32 (float64 for float64 weights) unless ``dtype``."""
        if dtype is None:
            dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        A, B = self._views()
        return delta_weight(self.randlora_lambda, self.randlora_gamma, A, B, self.scaling,
                            self.out_features < self.in_features, dtype)

    # -- forward -------------------------------------------------------------------------------
    def _plain(self, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        b = self.bias
        return F.linear(x, W, b)

    def _eval_weight(self, cd: torch.dtype) -> torch.Tensor | None:
        """``W + s·ΔW`` for gradient-free calls, cached until a parameter's version changes."""
        if torch.compiler.is_compiling():
            return None
        try:
            key = (self.randlora_lambda._version, self.randlora_gamma._version, self.weight._version,
                   id(self.weight), id(self.randlora_lambda), id(self.randlora_gamma), cd,
                   self.weight.device, self._bank.A.data_ptr())
        except RuntimeError:  # inference tensors have no version counter
            return None
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        W = self._w()
        Weff = (W.to(torch.float32 if W.dtype != torch.float64 else W.dtype) + self.delta_weight()).to(cd)
        self._cache = (key, Weff)
        return Weff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self._w()
        if self.merged:
            if self.disabled:
                return self._plain(x, (W.float() - self.delta_weight(torch.float32)).to(W.dtype))
            return self._plain(x, W)
        if self.disabled:
            return self._plain(x, W)
        if torch.is_autocast_enabled(x.device.type):
            cd, out_dtype = torch.get_autocast_dtype(x.device.type), None
        else:
            cd, out_dtype = W.dtype, x.dtype
        A, B = self._views()
        drop = self.training and isinstance(self.dropout, nn.Dropout)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(cd)
            if not torch.is_grad_enabled() and not drop:
                Weff = self._eval_weight(cd)
                if Weff is not None:
                    b = self.bias.to(cd) if self.bias is not None else None
                    y = F.linear(xc, Weff, b)
                    return y if out_dtype is None else y.to(out_dtype)
            lam, gam, s = self.randlora_lambda, self.randlora_gamma, self.scaling
            if drop:
                b = self.bias.to(cd) if self.bias is not None else None
                y = F.linear(xc, W.to(cd), b) + randlora_linear(self.dropout(xc), None, None, lam, gam, A, B, s,
                                                                self.path)
            else:
                y = randlora_linear(xc, W, self.bias, lam, gam, A, B, s, self.path)
        return y if out_dtype is None else y.to(out_dtype)

    # -- merge ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge_(self, safe: bool = False) -> None:
        """Fold ``s·ΔW`` into the weight (accumulated in float32, cast back to the weight's dtype)."""
        if self.merged:
            raise StateError("layer is already merged; call randlora.unmerge(model) first")
        W = self._w()
        acc = torch.float64 if W.dtype == torch.float64 else torch.float32
        new = W.to(acc) + self.delta_weight(acc)
        if safe and not torch.isfinite(new).all():
            raise StateError("merging would make the weight non-finite")
        W.copy_(new.to(W.dtype))
        self.merged = True
        self._cache = None

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Subtract ``s·ΔW`` from the weight again."""
        if not self.merged:
            raise StateError("layer is not merged; nothing to unmerge")
        W = self._w()
        acc = torch.float64 if W.dtype == torch.float64 else torch.float32
        W.copy_((W.to(acc) - self.delta_weight(acc)).to(W.dtype))
        self.merged = False
        self._cache = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, n={self.n}, "
                f"scaling={self.scaling:g}, bias={self.bias is not None}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (", merged" if self.merged else "") + (", disabled" if self.disabled else ""))
