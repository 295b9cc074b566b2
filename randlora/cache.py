"""The opt-in update cache: keep each layer's ``s·ΔW`` between calls, reused only while it is provably valid.

Outside :func:`cached` nothing is kept from one call to the next: every forward builds what it needs from
the current values of ``W``, ``λ`` and ``γ``. Inside it, a layer keeps ``D = s·ΔW`` (float32, or float64
for float64 weights) and reuses it while the values of its ``λ`` and ``γ`` equal the copies taken when
``D`` was built. The check compares values, not version counters: fused optimisers and writes through
``.data`` change parameters without bumping their versions. ``W`` is never part of the cache: every call
forms ``W + D`` from the weight as it is now, so swapped or rewritten base weights are always seen.

Every forward inside :func:`cached` uses ``W + D`` the same way whether ``D`` was just built or reused,
so a hit and a miss give bit-identical results.
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .errors import ConfigError
from .ops import acc_dtype
from .paths import on_root

__all__ = ["DeltaCache", "cached"]


@dataclass
class _Entry:
    lam: torch.Tensor  # the values D was built from (copies)
    gam: torch.Tensor
    scaling: float
    bases: tuple[torch.Tensor, torch.Tensor, int]  # the bank's tensors (identity) and generation
    delta: torch.Tensor  # s·ΔW, (O, I), in the accumulation dtype


class DeltaCache:
    """One layer's cached ``s·ΔW`` with the ``λ``/``γ`` values it was built from.

    Costs ``O·I`` values of the accumulation dtype (4 bytes each for float32/bf16/fp16 weights) plus copies
    of ``λ`` and ``γ``; each call compares ``n·r + n·m`` values (on CUDA: one host-device synchronisation).
    """

    def __init__(self) -> None:
        self.entry: _Entry | None = None
        self.builds = 0  # how many times D was (re)built: for tests and diagnostics

    def clear(self) -> None:
        self.entry = None

    @torch.no_grad()
    def delta(self, lam: torch.Tensor, gam: torch.Tensor, scaling: float, bases: tuple, build) -> torch.Tensor:
        """``s·ΔW`` for these values: the cached one if ``λ``, ``γ``, ``s`` and the bank are unchanged,
        else ``build()`` (which is then kept)."""
        e = self.entry
        if (e is not None and e.scaling == scaling and e.bases[2] == bases[2] and e.bases[0] is bases[0]
                and e.bases[1] is bases[1] and e.lam.device == lam.device and e.lam.dtype == lam.dtype
                and e.gam.dtype == gam.dtype and torch.equal(e.lam, lam) and torch.equal(e.gam, gam)):
            return e.delta
        self.entry = None  # free the stale one before building
        D = build()
        self.entry = _Entry(lam.detach().clone(), gam.detach().clone(), scaling, bases, D)
        self.builds += 1
        return D


def _layer_bytes(layer) -> int:
    return layer.out_features * layer.in_features * acc_dtype(layer.weight.dtype).itemsize


@contextlib.contextmanager
@on_root
def cached(model: nn.Module, *, max_bytes: int | None = None) -> Iterator[list[str]]:
    """Keep each adapted layer's ``s·ΔW`` between calls while inside the block; free it on exit.

    Use it around an evaluation loop of an unmerged model, or around the micro-batches of one
    gradient-accumulation step: a layer then builds ``s·ΔW`` once and, while its ``λ``/``γ`` values stay
    the same, every further call costs ``W + s·ΔW`` (``O·I`` additions) and one matmul. Results are
    correct whatever changes parameters inside the block (any optimiser, ``.data`` writes, weight swaps,
    ``load_state_dict``): the cache is checked against the current values on every call.

    Args:
        model: a model with a RandLora adapter.
        max_bytes: memory budget for the cached updates (``O·I`` float32 values per layer, float64 for
            float64 weights). Layers get a cache in model order, each one while it fits in what is left
            of the budget; the others compute as outside the block. ``None``: every adapted layer.

    Returns:
        A context manager yielding the names of the layers that cache.

    Raises:
        StateError: the model has no adapter.
        ConfigError: ``max_bytes`` is not a non-negative int.
    """
    from .walker import require_bank, adapted_layers

    require_bank(model)
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral)
                                  or max_bytes < 0):
        raise ConfigError(f"max_bytes must be a non-negative int (bytes) or None, got {max_bytes!r}")
    layers = list(adapted_layers(model))
    chosen, used, before = [], 0, []
    for name, layer in layers:
        size = _layer_bytes(layer)
        # a quantised base has no float W to add s·ΔW to: it computes its own part every call
        fits = not layer.quantized and (max_bytes is None or used + size <= max_bytes)
        before.append(layer.set_cache(DeltaCache() if fits else None))
        if fits:
            chosen.append(name)
            used += size
    try:
        yield chosen
    finally:
        for (_, layer), prev in zip(layers, before):
            layer.set_cache(prev)
