"""The explicit settings of an adapted layer that a call's route depends on, declared and checked in one place.

A call's route is a pure function of the call (shapes, dtypes, grad mode) and of these settings: ``disabled``
(adapters off), ``path`` (the op's path), ``keep`` (whether a training call keeps ``W + s·ΔW`` for backward)
and ``mixed`` (how a :func:`randlora.mixed` call runs). :func:`randlora.force_route` sets them for a block.
"""

from __future__ import annotations

from .errors import ConfigError
from .planner import KEEP_POLICIES, MIXED_PASSES, PATHS

__all__ = ["RouteSettings"]


class RouteSettings:
    """Mixin of :class:`randlora.layer.RandLoraLinear` (and any adapted layer type): the route settings, each
    ``"auto"`` (the planner decides) unless set."""

    disabled: bool
    path: str
    keep: str
    mixed: str

    def _declare_settings(self) -> None:
        self.disabled = False
        self.path = "auto"  # "auto" (cost model) | "weight" | "activation" | "sparse"
        self.keep = "auto"  # keep W + s·ΔW from forward for backward: "auto" (cost model) | "always" | "never"
        self.mixed = "auto"  # a randlora.mixed call: "auto" (cost model) | "grouped" | "batched" | "batched-sparse"

    def set_path(self, path: str) -> None:
        """Force the op's path: ``"auto"`` (cost model), ``"weight"``, ``"activation"`` or, for ternary bases,
        ``"sparse"`` (only the bases' non-zeros are touched). :func:`randlora.force_route` sets it for a block.

        Raises:
            ConfigError: ``path`` is not one of those, or ``"sparse"`` on dense bases.
        """
        if path not in PATHS + ("sparse",):
            raise ConfigError(f"path must be one of {PATHS + ('sparse',)}, got {path!r}")
        if path == "sparse" and self.bank.mode == "dense":
            raise ConfigError("path 'sparse' needs ternary bases; inject with bases='sparse' or bases='very_sparse'")
        self.path = path

    def set_keep(self, keep: str) -> None:
        """Whether a training call builds ``W + s·ΔW`` in forward and keeps it for backward: ``"auto"`` (when that
        saves multiply-adds and it is no larger than the saved input; ``layer.route(tokens).explain()`` says),
        ``"always"`` or ``"never"``. The choice is made afresh for every call.

        Raises:
            ConfigError: ``keep`` is not one of those.
        """
        if keep not in KEEP_POLICIES:
            raise ConfigError(f"keep must be one of {KEEP_POLICIES}, got {keep!r}")
        self.keep = keep

    def set_mixed(self, mixed: str) -> None:
        """Force how a :func:`randlora.mixed` call runs: ``"auto"`` (the planner's
        :func:`~randlora.planner.plan_mixed`), ``"grouped"`` (one op call per group of rows), ``"batched"`` (the
        frozen layer once plus one pass over the bases) or ``"batched-sparse"`` (that pass through ternary bases'
        non-zeros).

        Raises:
            ConfigError: ``mixed`` is not one of those, or ``"batched-sparse"`` on dense bases.
        """
        if mixed not in MIXED_PASSES:
            raise ConfigError(f"mixed must be one of {MIXED_PASSES}, got {mixed!r}")
        if mixed == "batched-sparse" and self.bank.mode == "dense":
            raise ConfigError("mixed 'batched-sparse' needs ternary bases; inject with bases='sparse' or "
                              "bases='very_sparse'")
        self.mixed = mixed
