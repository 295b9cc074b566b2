"""peft's adapter-folder format, in one place: file names, key prefix, the pinned layout version, how
``target_modules`` selects modules, and how a folder is written. Used by :mod:`randlora.peft_io` (RandLora
folders) and :mod:`randlora.export` (LoRA folders)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import torch

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "KEY_PREFIX", "PEFT_VERSION", "LORA_BIAS", "bias_key", "is_folder",
           "target_modules", "write_folder"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # peft's keys: KEY_PREFIX + <module path relative to the adapted model> + ...
PEFT_VERSION = "0.21.2"  # the peft release whose folder layout this library reads and writes
LORA_BIAS = {"none": "none", "all": "all", "randlora_only": "lora_only"}  # bias modes as peft LoRA names them


def is_folder(path) -> bool:
    """Whether ``path`` is a folder holding a peft ``adapter_config.json``."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def target_modules(paths: Iterable[str], names: Iterable[str]) -> list[str] | str:
    """``target_modules`` that makes peft select exactly ``paths`` among the model's module ``names``: the
    sorted paths as a list when peft's list matching (equal, or ending with ``.entry``) selects only them,
    else a full-match regular expression."""
    chosen = sorted(set(paths))
    clash = [n for n in names if n and n not in chosen and any(n == p or n.endswith("." + p) for p in chosen)]
    if not clash:
        return chosen
    return "(" + "|".join(re.escape(p) for p in chosen) + ")"


def bias_key(name: str, adapted) -> str:
    """peft's key for the trained bias ``name``: an adapted layer keeps its own bias on its wrapped
    ``base_layer``; any other bias keeps its path."""
    owner = name[: -len(".bias")] if name != "bias" else ""
    return f"{KEY_PREFIX}{owner}.base_layer.bias" if owner in adapted else f"{KEY_PREFIX}{name}"


def write_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write ``WEIGHTS_FILE`` and ``CONFIG_FILE`` into ``folder`` (created), each atomically."""
    from safetensors.torch import save_file

    from .filefmt import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)))
