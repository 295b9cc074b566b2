"""The opt-in update cache: keep each layer's ``s·ΔW`` between calls, reused only while it is provably valid.

Outside :func:`cached` nothing is kept from one call to the next: every forward builds what it needs from
the current values of ``W``, ``λ`` and ``γ``. Inside it, a layer keeps ``D = s·ΔW`` (float32, or float64
for float64 weights) and reuses it while the values of its ``λ`` and ``γ`` equal the copies taken when
``D`` was built. The check compares values, not version counters: fused optimisers and writes through
``.data`` change parameters without bumping their versions. ``W`` is never part of the cache: every call
forms ``W + D`` from the weight as it is now, so swapped or rewritten base weights are always seen.

Every forward inside :func:`cached` uses ``W + D`` the same way whether ``D`` was just built or reused,
so a hit and a miss give bit-identical results.

``cached(model, frozen_base=True)`` is for evaluation and serving, where the base weights do not change: a layer
then keeps ``W + D`` itself (in the compute dtype) and a no-grad call is one matmul with it, the base layer's
cost. The kept matrix is still rebuilt when ``λ``/``γ`` values, the adapter, the bank or the compute dtype
change, and when the weight Parameter is replaced or written in place through autograd (its identity, storage
and version counter); a write through ``.data`` is not seen there, which is what the user opts in to.
"""

from __future__ import annotations

import contextlib
import ctypes
import numbers
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .ops import acc_dtype
from .paths import on_root

__all__ = ["DeltaCache", "cached"]


@dataclass
class _Entry:
    lam: torch.Tensor  # the values the kept tensor was built from (copies)
    gam: torch.Tensor
    scaling: float
    bases: tuple[torch.Tensor, torch.Tensor, int]  # the bank's tensors (identity) and generation
    kept: torch.Tensor  # s·ΔW (O, I) in the accumulation dtype; with frozen_base, W + s·ΔW in the compute dtype
    weight_key: tuple | None = None  # frozen_base: (weight Parameter, its storage, version, compute dtype)

    def holds(self, lam: torch.Tensor, gam: torch.Tensor, scaling: float, bases: tuple) -> bool:
        """Whether it was built from these values of ``λ``, ``γ``, ``s`` and this bank."""
        return (self.scaling == scaling and self.bases[2] == bases[2] and self.bases[0] is bases[0]
                and self.bases[1] is bases[1] and self.lam.device == lam.device and same_bits(self.lam, lam)
                and same_bits(self.gam, gam))


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _libc_memcmp():
    """The C library's ``memcmp`` (None where it cannot be loaded, e.g. Windows: numpy compares instead)."""
    try:
        f = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError, TypeError):
        return None
    f.argtypes, f.restype = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t), ctypes.c_int
    return f


_MEMCMP = _libc_memcmp()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (same device) hold the same dtype, shape and bits. On the CPU one ``memcmp`` of their
    memory when both are contiguous (about 2.5x faster than numpy's comparison and 5x faster than ``torch.equal`` on
    the 10-100 thousand values of ``λ``/``γ``, the cost of every cached call), else numpy's; elsewhere
    ``torch.equal`` of their integer views."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = _BITS.get(a.element_size())
    if bits is None or a.is_complex():
        return torch.equal(a, b)
    if a.device.type != "cpu":
        return torch.equal(a.detach().view(bits), b.detach().view(bits))
    if _MEMCMP is not None and a.is_contiguous() and b.is_contiguous():
        return _MEMCMP(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0
    return bool(np.array_equal(a.detach().view(bits).numpy(), b.detach().view(bits).numpy()))


class DeltaCache:
    """One layer's kept ``s·ΔW`` (or, with ``frozen_base``, ``W + s·ΔW``) with the ``λ``/``γ`` values it was
    built from.

    Costs ``O·I`` values of the accumulation dtype (4 bytes each for float32/bf16/fp16 weights; with
    ``frozen_base``, of the compute dtype) plus copies of ``λ`` and ``γ``; each call compares ``n·r + n·m``
    values (on CUDA: one host-device synchronisation).
    """

    def __init__(self, frozen_base: bool = False) -> None:
        self.entry: _Entry | None = None
        self.frozen_base = frozen_base
        self.builds = 0  # how many times the kept tensor was (re)built: for tests and diagnostics

    def clear(self) -> None:
        self.entry = None

    @property
    def nbytes(self) -> int:
        """Bytes held now: the kept tensor and the copies of ``λ``, ``γ`` it was built from (0 before the first call)."""
        e = self.entry
        return 0 if e is None else sum(t.numel() * t.element_size() for t in (e.kept, e.lam, e.gam))

    def weight_of(self, layer, ad, cd: torch.dtype, with_weight: bool = True) -> torch.Tensor:
        """``W + s·ΔW`` of adapter ``ad`` on the adapted ``layer`` (a layer, or an adapted parameter shaped as it is)
        in ``cd``; ``with_weight`` False: its ``s·ΔW`` alone (for calls whose frozen part is computed apart: a
        quantised base's own forward, dropout in training).

        Kept: ``s·ΔW`` in the accumulation dtype (built by ``layer.delta_of``), reused while ``λ``, ``γ`` values,
        ``s`` and the bank are those it was built from; ``W + s·ΔW`` is formed from ``W`` as it is now on every
        call. With ``frozen_base`` the result itself is kept (in ``cd``), also while the weight Parameter's identity,
        storage and version are unchanged. Both modes give the same bits (one formula, ``(W + D)`` accumulated in
        ``D``'s dtype, then cast)."""
        lam, gam, s, bank = ad.randlora_lambda, ad.randlora_gamma, ad.scaling, layer.bank
        bases = (bank.A, bank.B, bank.generation)
        key = _key(layer.weight, cd, with_weight) if self.frozen_base else None
        e = self.entry
        if e is not None and _same_key(e.weight_key, key) and e.holds(lam, gam, s, bases):
            kept = e.kept
        else:
            kept = self._rebuild(lam, gam, s, bases, lambda: self._make(layer, ad, cd, with_weight), key)
        if self.frozen_base:
            return kept
        return _plus(layer.weight_matrix(), kept, cd) if with_weight else kept.to(cd)

    def _make(self, layer, ad, cd: torch.dtype, with_weight: bool) -> torch.Tensor:
        """What is kept: ``s·ΔW`` in the accumulation dtype, or with ``frozen_base`` the call's result in ``cd``."""
        D = layer.delta_of(ad, acc_dtype(ad.randlora_lambda.dtype if layer.quantized else layer.weight.dtype))
        if not self.frozen_base:
            return D
        return _plus(layer.weight_matrix(), D, cd) if with_weight else D.to(cd)

    def _rebuild(self, lam: torch.Tensor, gam: torch.Tensor, scaling: float, bases: tuple, make,
                 weight_key: tuple | None = None) -> torch.Tensor:
        """Free the stale entry, keep ``make()`` with snapshots of the values it was built from, return it."""
        self.entry = None  # (before building: the stale tensor is not held beside the new one)
        with torch.no_grad():  # (only here: a kept tensor is reused as it is, under any grad mode)
            kept = make()
        self.entry = _Entry(lam.detach().clone(), gam.detach().clone(), scaling, bases, kept, weight_key)
        self.builds += 1
        return kept


def _plus(W: torch.Tensor, D: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """``W + s·ΔW`` in ``cd``: the one formula of both modes, ``(W + D)`` accumulated in ``D``'s dtype, then cast
    (no graph, whatever ``W`` needs)."""
    with torch.no_grad():
        return (W.to(D.dtype) + D).to(cd)


def _key(param: torch.Tensor, cd: torch.dtype, with_weight: bool) -> tuple:
    """What a kept ``frozen_base`` result depends on besides ``λ``/``γ``: the weight Parameter (identity, storage,
    version) and ``cd``, or for ``s·ΔW`` alone only ``cd``."""
    return (param, param.data_ptr(), param._version, cd) if with_weight else ("s·ΔW", cd)


def _same_key(a: tuple | None, b: tuple | None) -> bool:
    """Equal keys (the Parameter compared by identity, never by value)."""
    if a is None or b is None or len(a) != len(b):
        return a is b
    return (a == b) if isinstance(a[0], str) else (a[0] is b[0] and a[1:] == b[1:])


def _layer_bytes(layer, frozen_base: bool) -> int:
    """What a layer's kept tensor costs: its weight's values (``O·I``, ``E·a·b`` for expert tensors) in the
    accumulation dtype, or with ``frozen_base`` in the weight's (a quantised layer keeps its ``s·ΔW`` in the compute
    dtype: counted at the adapter's, float32)."""
    if layer.quantized:
        return layer.out_features * layer.in_features * layer.randlora_lambda.dtype.itemsize
    dtype = layer.weight.dtype if frozen_base else acc_dtype(layer.weight.dtype)
    return layer.weight.numel() * dtype.itemsize


@contextlib.contextmanager
@on_root
def cached(model: nn.Module, *, max_bytes: int | None = None, frozen_base: bool = False) -> Iterator[list[str]]:
    """Keep each adapted layer's ``s·ΔW`` between calls while inside the block; free it on exit.

    Use it around an evaluation loop of an unmerged model, or around the micro-batches of one
    gradient-accumulation step: a layer then builds ``s·ΔW`` once and, while its ``λ``/``γ`` values stay
    the same, every further call costs ``W + s·ΔW`` (``O·I`` additions) and one matmul. Results are
    correct whatever changes parameters inside the block (any optimiser, ``.data`` writes, weight swaps,
    ``load_state_dict``): the cache is checked against the current values on every call.

    With ``frozen_base=True`` (evaluation and serving: the base weights do not change inside the block) a layer
    keeps ``W + s·ΔW`` itself and a no-grad call is one matmul with it, at the base layer's cost (a decode
    step, one token, included). ``λ``/``γ`` values, the active adapter and the bank are still checked on every
    call, and so are the weight Parameter's identity, storage and version counter (a replaced weight,
    ``load_state_dict``, an in-place write under ``no_grad``); a write to a base weight through ``.data`` is
    not seen: leave the block first. Outputs equal those of the default mode bit for bit.

    A quantised base layer (bitsandbytes, torchao) has no float ``W``: it keeps ``s·ΔW`` (in the compute dtype
    with ``frozen_base``), and a no-grad call is its own quantised matmul plus one dense matmul with it.

    Adapted parameters (``target_parameters``: expert tensors) keep the same per tensor (``E·a·b`` values), so a
    no-grad call of their module forms ``W + s·ΔW`` from the kept ``s·ΔW`` (or, with ``frozen_base``, uses the
    kept ``W + s·ΔW``) instead of building every expert's update again. Layer types whose module reads its
    weight (the attention ``in_proj``, convolutions) keep theirs the same way.

    Args:
        model: a model with a RandLora adapter.
        max_bytes: memory budget for the kept tensors: as many values as the weight per layer (``O·I``), float32
            (float64 for float64 weights), or with ``frozen_base`` of the weight's dtype (a quantised layer's
            counted as float32). Layers get a cache in model order, then the adapted parameters, each one while it
            fits in what is left of the budget; the others compute as outside the block. ``None``: every one.
        frozen_base: keep ``W + s·ΔW`` (one more copy of each adapted weight) instead of ``s·ΔW``, taking the
            base weights as frozen inside the block (see above).

    Returns:
        A context manager yielding the names of the layers (and adapted parameters) that cache.

    Raises:
        StateError: the model has no adapter.
        ConfigError: ``max_bytes`` is not a non-negative int, or ``frozen_base`` not a bool.
    """
    from .walker import require_bank, adapted_weights

    require_bank(model)
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral)
                                  or max_bytes < 0):
        raise ConfigError(f"max_bytes must be a non-negative int (bytes) or None, got {max_bytes!r}")
    if not isinstance(frozen_base, bool):
        raise ConfigError(f"frozen_base must be True or False, got {frozen_base!r}")
    layers = list(adapted_weights(model))
    chosen, used, before = [], 0, []
    for name, layer in layers:
        size = _layer_bytes(layer, frozen_base)
        fits = max_bytes is None or used + size <= max_bytes
        before.append(layer.set_cache(DeltaCache(frozen_base) if fits else None))
        if fits:
            chosen.append(name)
            used += size
    adapted = [layer for _, layer in layers]
    armable = [(layer, layer.quantized) for layer in adapted if frozen_base and _armable(layer)]
    hooks = (model.register_forward_pre_hook(lambda *_: arm(armable)),
             model.register_forward_hook(lambda *_: disarm(armable), always_call=True)) if frozen_base else ()
    try:
        yield chosen
    finally:
        for h in hooks:
            h.remove()
        disarm(armable)
        for (_, layer), prev in zip(layers, before):
            layer.set_cache(prev)


def arm(layers: list[tuple]) -> None:
    """Before one no-grad call of the model inside ``cached(frozen_base=True)``: check each layer's kept matrix once
    (:func:`_armed`) so that the layer's calls inside this one are one matmul with it, without planning a route or
    comparing ``λ``/``γ`` again (nothing changes them inside a no-grad forward)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    try:
        for layer, quantized in layers:
            object.__setattr__(layer, "_armed", _armed(layer, quantized))
    except BaseException:  # (a check that raised: no layer stays armed from a call that did not run)
        disarm(layers)
        raise


def disarm(layers: list[tuple]) -> None:
    """After the model's call (also when it raised): no layer stays armed outside it."""
    if not torch.compiler.is_compiling():
        for layer, _ in layers:
            object.__setattr__(layer, "_armed", None)


def _armable(layer) -> bool:
    """Whether a layer's plain call can be armed at all: a linear layer's own forward (a layer type with its own, a
    convolution, does not read the armed matrix) whose weights accelerate does not keep off the device."""
    from .layer import RandLoraLinear
    from .offload import offloaded

    return type(layer).forward is RandLoraLinear.forward and not offloaded(layer)


def _armed(layer, quantized: bool) -> tuple | None:
    """``(kept, bias, quantised)`` for :meth:`RandLoraLinear._armed_call <randlora.layer.RandLoraLinear>`, or None
    where a call would not be one matmul with the kept matrix: merged, disabled, inside :func:`randlora.mixed`,
    dropout in training, or no kept matrix of the kind a call keeps (``W + s·ΔW``, or ``s·ΔW`` on a quantised base)
    in the layer's own compute dtype yet (the next routed call builds it). The kept matrix is validated as any
    cached call does (``λ``/``γ`` values, adapter, bank, weight; rebuilt if stale)."""
    c = layer._cache
    e = c.entry if c is not None and c.frozen_base else None
    if e is None or e.weight_key is None or layer.merged_name is not None or layer.disabled \
            or layer._bank.mixed_block is not None:
        return None
    ad = layer.adapter()
    cd = e.weight_key[-1]
    if (ad is None or (layer.training and ad.drops) or isinstance(e.weight_key[0], str) != quantized
            or (not quantized and cd is not layer.weight.dtype)):
        return None
    kept = c.weight_of(layer, ad, cd, not quantized)
    bias = None if quantized or layer.bias is None else layer.bias.to(cd)
    return kept, bias, quantized
