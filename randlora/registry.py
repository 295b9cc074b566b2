"""The adapter registry: every adapter's settings, which one is active, and what ``inject`` froze.

One :class:`Registry` per adapted model, held by its basis bank (``model.randlora_bank.registry``). It is
the single source of truth for the active adapter: layers read it, nothing copies it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple

from .errors import ConfigError, StateError

__all__ = ["AdapterConfig", "Registry", "DEFAULT", "BIAS_MODES", "Init", "INITS", "DEFAULT_INIT", "get_init",
           "FILE_DEFAULTS"]

DEFAULT = "default"
BIAS_MODES = ("none", "all", "randlora_only")  # AdapterConfig.bias


class Init(NamedTuple):
    """A starting point for an adapter: ``λ = 0`` (so the layer starts equal to its base) and ``γ = gamma(n, m)``."""

    gamma: Callable[[int, int], float]
    """``γ``'s starting value on a layer with ``n`` bases of width ``m``."""
    alpha_scale: float
    """:func:`randlora.inject`'s default ``alpha / r`` with this initialisation (docs/benchmarks.md)."""


INITS = {
    "sqrt": Init(lambda n, m: max(n, m) ** -0.5, 1.0),  # γ at the scale of LoRA's A: AdamW works at 1e-3 and 3e-3
    "peft": Init(lambda n, m: 1.0 / max(n, m), 6.0),  # peft's initialisation
}
DEFAULT_INIT = "sqrt"

FILE_DEFAULTS = {"init": "peft", "alpha": 640.0}
"""What a stored config that lacks a setting was made with: files from before ``init`` existed used peft's start,
and ``alpha`` defaulted to 640 when it was first stored (:meth:`AdapterConfig.from_dict`)."""


def get_init(name: str) -> Init:
    """The initialisation called ``name``.

    Raises:
        ConfigError: ``name`` is not a key of :data:`INITS`.
    """
    if name not in INITS:
        raise ConfigError(f"unknown init {name!r}; use one of {list(INITS)}")
    return INITS[name]


@dataclass
class AdapterConfig:
    """The settings an adapter was made with (stored in checkpoints, read back by :func:`randlora.load`)."""

    targets: list[str]
    """Full names of the adapted layers, in model order."""
    r: int = 32
    """Rank of each random basis. Smaller ``r`` means more bases (``n = ceil(min(O, I) / r)``) and more
    trainable values (``n·r + n·min(O, I)`` per layer)."""
    alpha: float = None  # type: ignore[assignment]
    """Scale numerator: the update is ``(alpha / r) · ΔW``. None (the default) becomes ``inject``'s default for
    ``init``: ``1 · r`` with ``init="sqrt"``, ``6 · r`` with ``init="peft"``."""
    init: str = DEFAULT_INIT
    """Where ``γ`` started (``λ`` starts at 0): ``"sqrt"`` (``1 / sqrt(max(n, m))``) or ``"peft"``
    (``1 / max(n, m)``). Used by ``reset_parameters`` and ``to_empty``; stored configs without it were made with
    ``"peft"`` (:meth:`from_dict`)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input (training only; the frozen path never drops)."""
    seed: int = 0
    """Seed of the shared random bases (with ``recipe``, ``bases`` and the bank shape it fixes them)."""
    bases: str = "dense"
    """``"dense"``, ``"sparse"`` (ternary, density 1/3) or ``"very_sparse"`` (ternary, density 1/√m)."""
    recipe: str = "portable"
    """How bases are generated: ``"portable"`` (bit-identical everywhere) or ``"peft"`` (bit-exact with peft)."""
    bias: str = "none"
    """Which biases train: ``"none"``, ``"all"`` (every bias of the model) or ``"randlora_only"``."""
    fan_in_fan_out: list[str] = field(default_factory=list)
    """The targets whose weight is stored ``(in, out)`` (GPT-2 ``Conv1D``)."""
    target_parameters: list[str] = field(default_factory=list)
    """Full names of the adapted 2-D / 3-D parameters (``inject(..., target_parameters=...)``), in model order."""

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = get_init(self.init).alpha_scale * self.r

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        """The settings a stored config (a file's metadata) names; a setting it lacks takes the value it had
        when the file was written (:data:`FILE_DEFAULTS`), not today's default.

        Raises:
            TypeError: ``d`` is not a dict or has keys this class lacks (``targets`` included).
        """
        if not isinstance(d, dict):
            raise TypeError(f"expected a JSON object, got {type(d).__name__}")
        return cls(**{**FILE_DEFAULTS, **d})


@dataclass
class Registry:
    """A model's adapters, in the order they were added, and the active one."""

    adapters: dict[str, AdapterConfig]
    active: str
    grad_flags: dict[str, bool] = field(default_factory=dict)
    """``requires_grad`` of every parameter before ``inject`` froze them; ``eject`` puts them back."""

    def resolve(self, name: str | None) -> str:
        """``name`` checked against the adapters (None: the active one).

        Raises:
            StateError: there is no adapter ``name``.
        """
        if name is None:
            return self.active
        if name not in self.adapters:
            raise StateError(f"the model has no adapter {name!r}; its adapters are {list(self.adapters)}. "
                             f"Add one with randlora.inject(model, targets, name={name!r})")
        return name

    def config(self, name: str | None = None) -> AdapterConfig:
        """The settings of adapter ``name`` (default: the active one)."""
        return self.adapters[self.resolve(name)]
