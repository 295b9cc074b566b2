"""One adapter's state (:class:`Adapter`) and the bookkeeping of several adapters on one adapted layer
(:class:`AdapterSlots`): which adapter is held where, added and removed in one place."""

from __future__ import annotations

import torch
from torch import nn

from .errors import StateError
from .registry import DEFAULT, DEFAULT_INIT, get_init

__all__ = ["Adapter", "AdapterSlots"]


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


class AdapterSlots(Adapter):
    """An :class:`Adapter` whose own slots hold the first adapter (``adapter_name``) and whose ``randlora_extra``
    (a ``ModuleDict``) holds each further one. Only :meth:`add_adapter` and :meth:`remove_adapter` know where an
    adapter is held; everything else asks :meth:`adapter`. The active adapter's name is the model's registry's
    (``self.bank.registry``), read through :attr:`active`."""

    adapter_name: str
    merged_name: str | None
    """The adapter folded into the weight, if any (``merge_`` / ``unmerge_``; ``_fold`` is the subclass's)."""
    _what = "layer"  # how errors name the holder
    _cache = None  # a randlora.cache.DeltaCache while inside randlora.cached(...), set by set_cache

    @property
    def cache(self):
        """The :class:`randlora.cache.DeltaCache` inside :func:`randlora.cached` (None outside)."""
        return self._cache

    def set_cache(self, cache) -> object:
        """Install ``cache`` (a :class:`randlora.cache.DeltaCache`, or None); returns the previous one. Used by
        :func:`randlora.cached`."""
        prev = self._cache
        object.__setattr__(self, "_cache", cache)
        return prev

    @property
    def merged(self) -> bool:
        """Whether an adapter's ``s·ΔW`` is folded into the weight (see ``merge_``)."""
        return self.merged_name is not None

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Subtract ``s·ΔW`` from the weight again.

        Raises:
            StateError: not merged.
        """
        if not self.merged:
            raise StateError(f"{self._what} is not merged; nothing to unmerge")
        self._fold(self.merged_name, -1.0)
        self.merged_name = None

    @property
    def active(self) -> str:
        """The model's active adapter (its registry is the one source of truth)."""
        reg = self.bank.registry
        return reg.active if reg is not None else DEFAULT

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
