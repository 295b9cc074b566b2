"""The library's error model: every refusal is a :class:`RandLoraError` (a ``ValueError``)."""

from __future__ import annotations

__all__ = [
    "RandLoraError",
    "TargetError",
    "ConfigError",
    "StateError",
    "CheckpointError",
    "FingerprintMismatch",
]


class RandLoraError(ValueError):
    """Base class of every error this library raises on bad input or bad state."""


class TargetError(RandLoraError):
    """The ``targets`` / ``layers`` / ``exclude`` selection is wrong (matches nothing, not linear, ...)."""


class ConfigError(RandLoraError):
    """An adapter setting (``r``, ``alpha``, ``dropout``, ``bases``, ``recipe``, ``bias``, ...) is invalid."""


class StateError(RandLoraError):
    """The call does not fit the model's current state (not injected, already merged, ...)."""


class CheckpointError(RandLoraError):
    """A checkpoint or file cannot be loaded: missing/unexpected keys, wrong shapes, bad file."""


class FingerprintMismatch(CheckpointError):
    """A checkpoint was made with other bases (seed, recipe, mode, shapes or checksum differ)."""
