"""Quantised base layers: which layers count as quantised (bitsandbytes 4/8-bit, torchao weights) and how to
read their float weight. Duck typing: neither library is imported unless such a layer is dequantised."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .errors import StateError

__all__ = ["is_quantized", "dequantize"]


@functools.lru_cache(maxsize=None)
def _torchao_class(cls: type) -> bool:
    return any(c.__name__ == "TorchAOBaseTensor" for c in cls.__mro__)


def _is_torchao(W: torch.Tensor) -> bool:
    """A torchao quantised weight (a ``TorchAOBaseTensor`` subclass, e.g. int8 weight-only's ``Int8Tensor``); the
    answer per class is remembered (every adapted call asks)."""
    return _torchao_class(type(W))


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


def save_quantized(layer: nn.Module, destination: dict, prefix: str, keep_vars: bool) -> None:
    """An adapted layer's state for a quantised base: the weight, bias and quantisation state (absmax, quant_map,
    SCB, ...) exactly as the base saves them, then the layer's own parameters (the adapter's)."""
    layer.base_layer._save_to_state_dict(destination, prefix, keep_vars)
    for k, p in layer._parameters.items():
        if k not in ("weight", "bias") and p is not None:
            destination[prefix + k] = p if keep_vars else p.detach()


def forward_quantized(layer: nn.Module, x: torch.Tensor, ad) -> torch.Tensor:
    """An adapted layer's output on a quantised base: ``base_layer(x) + s · dropout(x) ΔWᵀ``, the base's own forward
    (its own saved tensors) plus the adapter's term alone (``W = None``: it keeps only ``x``, ``λ``, ``γ``)."""
    from . import core

    y = layer.base_layer(x)
    if ad is None:
        return y
    cd, _ = core.compute_dtype(x, x.dtype if x.is_floating_point() else ad.randlora_lambda.dtype)
    with torch.autocast(x.device.type, enabled=False):
        d = layer.term(ad.dropout(x.to(cd)), None, None, ad)
    return y + d.to(y.dtype)
