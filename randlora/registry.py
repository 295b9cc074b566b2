"""The adapter registry: every adapter's settings, which one is active, and what ``inject`` froze.

One :class:`Registry` per adapted model, held by its basis bank (``model.randlora_bank.registry``). It is
the single source of truth for the active adapter: layers read it, nothing copies it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import StateError

__all__ = ["AdapterConfig", "Registry", "DEFAULT", "BIAS_MODES"]

DEFAULT = "default"
BIAS_MODES = ("none", "all", "randlora_only")  # AdapterConfig.bias


@dataclass
class AdapterConfig:
    """The settings an adapter was made with (stored in checkpoints, read back by :func:`randlora.load`)."""

    targets: list[str]
    """Full names of the adapted layers, in model order."""
    r: int = 32
    """Rank of each random basis. Smaller ``r`` means more bases (``n = ceil(min(O, I) / r)``) and more
    trainable values (``n·r + n·min(O, I)`` per layer)."""
    alpha: float = 640.0
    """Scale numerator: the update is ``(alpha / r) · ΔW``. ``inject``'s default is ``1 · r`` with ``init="sqrt"``,
    ``6 · r`` with ``init="peft"``."""
    init: str = "peft"
    """Where ``γ`` started (``λ`` starts at 0): ``"sqrt"`` (``1 / sqrt(max(n, m))``) or ``"peft"``
    (``1 / max(n, m)``). Used by ``reset_parameters`` and ``to_empty``; files without it were made with ``"peft"``."""
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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Registry:
    """A model's adapters, in the order they were added; the first one owns the layers' own ``λ``/``γ``."""

    adapters: dict[str, AdapterConfig]
    active: str
    grad_flags: dict[str, bool] = field(default_factory=dict)
    """``requires_grad`` of every parameter before ``inject`` froze them; ``eject`` puts them back."""

    @property
    def owner(self) -> str:
        """The first adapter: its ``λ``/``γ`` are the layers' ``randlora_lambda``/``randlora_gamma``."""
        return next(iter(self.adapters))

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
