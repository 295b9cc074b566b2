"""transformers ``Trainer`` integration: checkpoints that hold just the adapter.

A model adapted by :func:`randlora.inject` trains under ``transformers.Trainer`` as it is, but the
Trainer's checkpoints then hold the whole model and resuming knows nothing of the adapter. The Trainer
class made here changes only how the MODEL part of a checkpoint is written and read:

- ``_save`` (used for every ``checkpoint-N`` folder and by ``trainer.save_model()``) writes
  ``randlora_adapter.safetensors`` (:func:`randlora.save` with ``save_projection=False``: ``λ``, ``γ``,
  trained biases, the fingerprint) and the training arguments, not the model's weights. Optimiser,
  scheduler, RNG and trainer state are written by ``Trainer`` as usual.
- ``_load_from_checkpoint`` (``trainer.train(resume_from_checkpoint=...)``) and ``_load_best_model``
  (``load_best_model_at_end=True``) load that file into the model (verified against the model's bases,
  all or nothing).

Models without a RandLora adapter are handed to ``Trainer``'s own methods unchanged. transformers is
imported only when the class is first used (``RandLoraTrainer`` or :func:`trainer_class`).

Scope: one process or DDP (rank 0 writes). Under DeepSpeed or FSDP the Trainer saves through its own
engine paths; those are refused with a clear error rather than writing a checkpoint that cannot resume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError, StateError

__all__ = ["ADAPTER_FILE", "RandLoraTrainer", "trainer_class", "adapter_file"]

ADAPTER_FILE = "randlora_adapter.safetensors"
TRAINING_ARGS = "training_args.bin"  # the name transformers uses for the pickled TrainingArguments

_cache: dict[type, type] = {}


def adapter_file(checkpoint: str | os.PathLike) -> Path:
    """The adapter file of a checkpoint folder written by the Trainer from :func:`trainer_class`."""
    return Path(checkpoint) / ADAPTER_FILE


def _unwrap(trainer, model=None):
    model = trainer.model if model is None else model
    try:
        return trainer.accelerator.unwrap_model(model, keep_torch_compile=False)
    except (AttributeError, TypeError):
        return getattr(model, "module", model)


def _has_adapter(model) -> bool:
    from .walker import bank_of

    try:
        return bank_of(model) is not None
    except Exception:  # noqa: BLE001 - not an nn.Module (unusual wrappers): not ours
        return False


def _load_adapter(model, folder: str | os.PathLike, what: str) -> None:
    from .checkpoint import load_state_dict, read_file

    path = adapter_file(folder)
    if not path.is_file():
        raise CheckpointError(f"{what} {folder} holds no {ADAPTER_FILE}: it was not written by randlora's Trainer "
                              f"integration (files there: {sorted(p.name for p in Path(folder).iterdir())[:8]}). "
                              "Resume from a checkpoint of a run that used randlora.hf.RandLoraTrainer")
    tensors, _ = read_file(path)
    load_state_dict(model, tensors)


def _refuse_engines(trainer) -> None:
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise StateError("randlora's Trainer integration writes adapter-only checkpoints from one process or DDP; "
                         "DeepSpeed/FSDP checkpoints go through their own engines. Use the plain transformers "
                         "Trainer there and randlora.save(model, ...) on every rank after training")


class _Mixin:
    """What :func:`trainer_class` adds to a ``Trainer`` class (see the module docstring)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:  # type: ignore[override]
        model = _unwrap(self)
        if not _has_adapter(model):
            return super()._save(output_dir, state_dict=state_dict)  # type: ignore[misc]
        _refuse_engines(self)
        from .checkpoint import save

        output_dir = output_dir if output_dir is not None else self.args.output_dir  # type: ignore[attr-defined]
        if not self.args.should_save:  # type: ignore[attr-defined]
            return
        os.makedirs(output_dir, exist_ok=True)
        save(model, Path(output_dir) / ADAPTER_FILE, save_projection=False)
        if getattr(self, "processing_class", None) is not None:
            self.processing_class.save_pretrained(output_dir)  # type: ignore[attr-defined]
        import torch

        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS))  # type: ignore[attr-defined]

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:  # type: ignore[override]
        target = _unwrap(self, model)
        if not _has_adapter(target) or (not adapter_file(resume_from_checkpoint).is_file()
                                        and _full_checkpoint(resume_from_checkpoint)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        _refuse_engines(self)
        _load_adapter(target, resume_from_checkpoint, "the checkpoint")

    def _load_best_model(self) -> None:  # type: ignore[override]
        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        model = _unwrap(self)
        if not _has_adapter(model) or (not adapter_file(best).is_file() and _full_checkpoint(best)):
            return super()._load_best_model()  # type: ignore[misc]
        _refuse_engines(self)
        _load_adapter(model, best, "the best checkpoint")


def _full_checkpoint(folder: str | os.PathLike) -> bool:
    """A folder holding whole-model weights (a run without this integration): Trainer's own loader applies."""
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return any((Path(folder) / n).is_file() for n in names)


def trainer_class(base: type | None = None) -> type:
    """A subclass of ``base`` (default ``transformers.Trainer``; any subclass such as TRL's ``SFTTrainer``
    works) whose checkpoints hold just the RandLora adapter file.

    Args:
        base: the Trainer class to extend.

    Returns:
        The subclass (cached per ``base``).

    Raises:
        ImportError: transformers is not installed.
        TypeError: ``base`` is not a ``transformers.Trainer`` subclass.
    """
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("randlora.hf needs transformers: pip install transformers") from e
    base = transformers.Trainer if base is None else base
    if not isinstance(base, type) or not issubclass(base, transformers.Trainer):
        raise TypeError(f"base must be transformers.Trainer or a subclass of it, got {base!r}")
    if base not in _cache:
        _cache[base] = type(f"RandLora{base.__name__}", (_Mixin, base), {
            "__doc__": f"``{base.__name__}`` whose checkpoints hold just the RandLora adapter (randlora.hf).",
            "__module__": __name__,
        })
    return _cache[base]


def __getattr__(name: str):
    # ``RandLoraTrainer`` is built on first access, so importing randlora.hf does not import transformers
    if name == "RandLoraTrainer":
        return trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
