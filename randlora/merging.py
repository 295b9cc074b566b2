"""Merging: fold an adapter's ``s·ΔW`` into the weights (:func:`merge`), and take it out again (:func:`unmerge`)."""

from __future__ import annotations

import torch
from torch import nn

from . import offload
from .errors import ConfigError, StateError
from .layer import RandLoraLinear
from .quantized import dequantize
from .paths import on_root
from .experts import parameter_units
from .walker import _adapted_modules, _restore, _set_submodule, adapted_weights, registry_of, require_bank

__all__ = ["merge", "unmerge"]


def _merge_is_finite(layer: RandLoraLinear, name: str | None = None) -> bool:
    with offload.brought_in(layer, write=False):
        d = layer.delta_weight(name=name)
        return bool(torch.isfinite((layer.weight_matrix().to(d.dtype) + d).to(layer.weight.dtype)).all())


@torch.no_grad()
def _dequantized_merge(layer: RandLoraLinear, name: str, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize(W) + s·ΔW`` of a quantised layer, accumulated in float32 and cast to ``dtype``."""
    W = dequantize(layer.base_layer)
    W += layer.delta_weight(torch.float32, name)
    return W.to(dtype)


def _plain_linear(layer: RandLoraLinear, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` and the layer's bias (cast to ``dtype``), no init pass."""
    lin = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    b = layer.bias
    if b is not None:
        lin.bias = b if b.dtype == dtype else nn.Parameter(b.detach().to(dtype), requires_grad=b.requires_grad)
    lin.train(layer.training)
    return lin


@on_root
def merge(model: nn.Module, *, unload: bool = True, safe: bool = False, name: str | None = None,
          dequantize: bool = False, dtype: torch.dtype = torch.float32) -> None:
    """Fold ``s·ΔW`` into every adapted weight (float32 accumulation, cast back to the weight's dtype).

    A quantised (bitsandbytes 4-bit/8-bit, torchao) base cannot take ``s·ΔW`` without re-quantising, so it is
    refused unless ``dequantize=True``, which replaces each such layer by a plain ``nn.Linear`` holding
    ``dequantize(W) + s·ΔW`` (float32 accumulation, cast to ``dtype``) and its bias (see docs/quantized.md).

    Args:
        model: an adapted model.
        unload: put the original modules back (same keys and types as before :func:`inject`); with
            ``False`` the wrappers stay, merged (see :func:`unmerge`).
        safe: refuse, leaving every weight untouched, if any merged weight would be non-finite.
        name: the adapter to fold in (default: the active one); with ``unload=True`` the others go.
        dequantize: replace the quantised layers by ``nn.Linear`` layers in ``dtype`` (needs ``unload=True``).
        dtype: the floating-point dtype of those ``nn.Linear`` weights (and biases); other layers keep theirs.

    Raises:
        ConfigError: ``dequantize=True`` with ``unload=False``, or ``dtype`` not a floating-point dtype.
        StateError: no adapter, no adapter ``name``, already merged, the bank on another device than a
            layer, quantised layers without ``dequantize=True``, or (``safe``) a non-finite result.
    """
    if not isinstance(dequantize, bool):
        raise ConfigError(f"dequantize must be True or False, got {dequantize!r}")
    if dequantize and not unload:
        raise ConfigError("dequantize=True replaces the quantised layers by plain nn.Linear layers, so the wrappers "
                          "cannot stay: pass unload=True (the default), or dequantize=False")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
    name = registry_of(model).resolve(name)
    every = list(_adapted_modules(model)) + list(parameter_units(model))  # (adapted parameters: folded per expert)
    if any(l.merged for _, l in every):
        raise StateError("the model is already merged; call randlora.unmerge(model) first, or "
                         "randlora.eject(model) to drop the wrappers")
    layers = [(n, l) for n, l in every if l.adapter(name) is not None]
    quant = [n for n, l in layers if l.quantized]
    if quant and not dequantize:
        more = " ..." if len(quant) > 5 else ""
        raise StateError(f"layers {quant[:5]}{more} have quantised (bitsandbytes/torchao) weights: s·ΔW cannot "
                         "be folded into them without re-quantising (lossy). Options: "
                         "randlora.merge(model, dequantize=True, dtype=torch.bfloat16) for plain nn.Linear layers; "
                         "randlora.save(model, path) and `python -m randlora merge` against the unquantised base "
                         "weights; or keep the adapter unmerged (randlora.eject(model) drops it)")
    offload.check_merge(layers)  # weights accelerate offloads: written back through its offload
    for _, l in layers:
        l.views()  # raises (device mismatch) before any weight changes
    if safe:
        with torch.no_grad():
            # checked after the cast back to the weight's dtype: float16 can overflow where float32 did not
            bad = [n for n, l in layers
                   if not (bool(torch.isfinite(_dequantized_merge(l, name, dtype)).all()) if l.quantized
                           else _merge_is_finite(l, name))]
        if bad:
            raise StateError(f"merging would make the weights of {bad[:5]} non-finite (λ/γ hold inf/nan, or the "
                             "sum overflows the weight's dtype); "
                             "nothing was merged. Reload a good adapter or call randlora.eject(model).")
    del every
    for i, (n, layer) in enumerate(layers):
        if layer.quantized:
            # swapped at once and the last reference dropped: each quantised layer is freed (unless the caller
            # holds it) as its float replacement is built, so the peak is the float model plus one layer
            _set_submodule(model, n, _plain_linear(layer, _dequantized_merge(layer, name, dtype), dtype))
            layers[i] = None  # type: ignore[call-overload]
        else:
            with offload.brought_in(layer):
                layer.merge_(name=name)
        del layer
    if unload:
        _restore(model)


@on_root
def unmerge(model: nn.Module) -> None:
    """Undo ``merge(model, unload=False)``: subtract ``s·ΔW`` from every adapted weight again.

    Raises:
        StateError: the model has no adapter or is not merged.
    """
    require_bank(model)
    layers = list(adapted_weights(model))
    if not any(l.merged for _, l in layers):
        raise StateError("the model is not merged; nothing to unmerge (merge(model, unload=False) first)")
    for _, layer in layers:
        if layer.merged:
            with offload.brought_in(layer):
                layer.unmerge_()
