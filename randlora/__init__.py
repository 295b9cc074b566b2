"""randlora: full-rank parameter-efficient fine-tuning from fixed, seeded random bases.

``ΔW = (alpha / r) · Σ_i B_i diag(λ_i) A diag(γ_i)``: ``A``, ``B_i`` are random and shared by all
layers (one bank per model), only the diagonals ``λ`` (``r × n``) and ``γ`` (``n × min(O, I)``) train.
"""

from .bank import BasisBank, Fingerprint
from .checkpoint import load, load_state_dict, save, state_dict
from .errors import (
    CheckpointError,
    ConfigError,
    FingerprintMismatch,
    RandLoraError,
    StateError,
    TargetError,
)
from .layer import RandLoraLinear
from .peft_io import load_peft, read_peft, save_peft
from .ops import RandLoraFunction, randlora_linear
from .walker import (
    AdapterConfig,
    InjectReport,
    active_adapter,
    adapter_names,
    disabled,
    eject,
    inject,
    merge,
    summary,
    trainable_parameters,
    unmerge,
    use,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "BasisBank",
    "CheckpointError",
    "ConfigError",
    "Fingerprint",
    "FingerprintMismatch",
    "InjectReport",
    "RandLoraError",
    "RandLoraFunction",
    "RandLoraLinear",
    "StateError",
    "TargetError",
    "__version__",
    "active_adapter",
    "adapter_names",
    "disabled",
    "eject",
    "inject",
    "load",
    "load_peft",
    "load_state_dict",
    "merge",
    "randlora_linear",
    "read_peft",
    "save",
    "save_peft",
    "state_dict",
    "summary",
    "trainable_parameters",
    "unmerge",
    "use",
]
