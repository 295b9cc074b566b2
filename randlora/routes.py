"""``force_route``: the public seam to pin how adapted layers run, for tests, benchmarks and diagnosis.

Every route is the planner's choice from the call and each layer's explicit settings (``path``, ``keep``,
``mixed``); this context manager sets those settings on a model's adapted layers for a block and puts each
layer's own back on exit, error or not. Outputs are the same whatever the route (up to rounding); only speed
and memory change. ``layer.route(tokens).explain()`` shows what the planner would choose.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from .errors import StateError
from .walker import adapted_layers

__all__ = ["force_route"]

_SETTERS = {"path": "set_path", "keep": "set_keep", "mixed": "set_mixed"}


@contextlib.contextmanager
def force_route(model: nn.Module, path: str | None = None, *, keep: str | None = None,
                mixed: str | None = None) -> Iterator[None]:
    """Context manager: every adapted layer of ``model`` takes the given route settings inside the block.

    Args:
        model: an adapted model (or any module containing adapted layers).
        path: the op's path: ``"weight"`` (build ``W + s·ΔW``, one matmul), ``"activation"`` (through the
            bases), ``"sparse"`` (ternary bases' non-zeros) or ``"auto"``; None leaves each layer's.
        keep: whether a training call keeps ``W + s·ΔW`` for backward: ``"always"``, ``"never"``, ``"auto"``.
        mixed: how a :func:`randlora.mixed` call runs: ``"grouped"`` (one op call per group of rows),
            ``"batched"`` (the frozen layer once plus one pass over the bases), ``"batched-sparse"`` (that pass
            through ternary bases' non-zeros) or ``"auto"``.

    Raises:
        ConfigError: a value is not one of those (or ``"sparse"``/``"batched-sparse"`` on dense bases); no
            layer is changed.
        StateError: ``model`` holds no adapted layer.
    """
    wanted = {k: v for k, v in (("path", path), ("keep", keep), ("mixed", mixed)) if v is not None}
    layers = [layer for _, layer in adapted_layers(model)]
    if not layers:
        raise StateError("force_route: the model holds no adapted layer; call randlora.inject(model, ...) first")
    saved = [{k: getattr(layer, k) for k in wanted} for layer in layers]
    try:
        for layer in layers:  # the setters check each value (a refusal puts every layer's own back, below)
            for k, v in wanted.items():
                getattr(layer, _SETTERS[k])(v)
        yield
    finally:
        for layer, own in zip(layers, saved):
            for k, v in own.items():
                setattr(layer, k, v)
