"""randlora: full-rank parameter-efficient fine-tuning from fixed, seeded random bases.

``ΔW = (alpha / r) · Σ_i B_i diag(λ_i) A diag(γ_i)``: ``A``, ``B_i`` are random and shared by all
layers (one bank per model), only the diagonals ``λ`` (``r × n``) and ``γ`` (``n × min(O, I)``) train.
"""

# Checked before anything else is imported. 2.13 is the oldest torch the suite runs on, and the code uses
# APIs an old torch lacks (torch.get_autocast_dtype, torch.distributed.tensor): fail here, with the fix,
# rather than with an AttributeError in the middle of training.
import re as _re

import torch as _torch

_MIN_TORCH = (2, 13)
_found = _re.match(r"(\d+)\.(\d+)", str(_torch.__version__))
if _found is None or tuple(int(v) for v in _found.groups()) < _MIN_TORCH:
    raise ImportError(f"randlora needs torch >= {_MIN_TORCH[0]}.{_MIN_TORCH[1]} (found {_torch.__version__}); "
                      f"pip install 'torch>={_MIN_TORCH[0]}.{_MIN_TORCH[1]}'")
del _re, _torch, _found

from .bank import BasisBank, Fingerprint
from .cache import cached
from .checkpoint import load, load_state_dict, save, state_dict
from .errors import (
    CheckpointError,
    ConfigError,
    FingerprintMismatch,
    RandLoraError,
    StateError,
    TargetError,
)
from .export import save_lora, to_lora
from .experts import RandLoraParameter
from .adapter import Adapter
from .layer import RandLoraLinear
from .registry import DEFAULT_INIT, INITS
from .merging import merge, unmerge
from .named import delete
from .peft_io import load_peft, read_peft, save_peft
from .ops import RandLoraFunction, randlora_linear
from .routes import force_route
from .serving import mixed
from .walker import (
    AdapterConfig,
    InjectReport,
    active_adapter,
    adapter_names,
    disabled,
    eject,
    inject,
    summary,
    trainable_parameters,
    use,
)

__version__ = "0.2.0"  # the one source of the version: pyproject.toml reads it (tool.setuptools.dynamic)

__all__ = [
    "Adapter",
    "AdapterConfig",
    "BasisBank",
    "CheckpointError",
    "ConfigError",
    "DEFAULT_INIT",
    "Fingerprint",
    "FingerprintMismatch",
    "INITS",
    "InjectReport",
    "RandLoraError",
    "RandLoraFunction",
    "RandLoraLinear",
    "RandLoraParameter",
    "StateError",
    "TargetError",
    "__version__",
    "active_adapter",
    "adapter_names",
    "cached",
    "delete",
    "disabled",
    "eject",
    "force_route",
    "inject",
    "load",
    "load_peft",
    "load_state_dict",
    "merge",
    "mixed",
    "randlora_linear",
    "read_peft",
    "save",
    "save_lora",
    "save_peft",
    "state_dict",
    "summary",
    "to_lora",
    "trainable_parameters",
    "unmerge",
    "use",
]
