"""transformers ``Trainer`` integration: checkpoints that hold just the adapter.

A model adapted by :func:`randlora.inject` trains under ``transformers.Trainer`` as it is, but the
Trainer's checkpoints then hold the whole model and resuming knows nothing of the adapter. The Trainer
class made here changes only how the MODEL part of a checkpoint is written and read:

- ``save_model`` / ``_save`` (every ``checkpoint-N`` folder and ``trainer.save_model()``) write
  ``randlora_adapter.safetensors`` (:func:`randlora.save` with ``save_projection=False``: ``λ``, ``γ``,
  trained biases, the fingerprint) and the training arguments, never the model's weights. Optimiser,
  scheduler, RNG and trainer state are written by ``Trainer`` as usual. Parameters trained outside the
  adapter (a task head outside the injected submodule) go to ``randlora_trainable.safetensors`` beside it
  (its metadata records where the adapter's root sits in the model) and are restored with it, by resume and
  by ``randlora.load(model, folder)`` and ``python -m randlora merge`` (:func:`read_trainable`,
  :meth:`Trainable.place`); under FSDP2 the optimiser goes
  through accelerate's optimiser writer without the model writer, under DeepSpeed through the engine's
  ``save_checkpoint(exclude_frozen_parameters=True)``, so no engine file holds the frozen weights either.
- ``_load_from_checkpoint`` (``trainer.train(resume_from_checkpoint=...)``) and ``_load_best_model``
  (``load_best_model_at_end=True``) load that file into the model (verified against the model's bases,
  all or nothing); under DeepSpeed the engine's own checkpoint restores the optimiser (and its fp32 copies)
  first, then the adapter file is loaded on top.

The adapter is found wherever it sits in the Trainer's model (:func:`randlora.paths.locate`): on the model
itself or on any submodule (``inject(wrapper.encoder, ...)``), under DDP's ``module.``, ``torch.compile``'s
``_orig_mod.``, accelerate's FSDP2 and DeepSpeed wrappers. A Trainer whose model holds no RandLora adapter
is refused when it is built (:class:`randlora.StateError`), as are set-ups whose checkpoints this class
cannot write adapter-only (FSDP1, XLA/TPU, SageMaker model parallel): nothing falls back to writing the
whole model.

Engines: one process, DDP, FSDP2 (accelerate) and DeepSpeed ZeRO stages 0-3 (tested: 2 and 3); every
rank takes part in the gathers, the main process writes. transformers is imported only when the class is
first used (``RandLoraTrainer`` or :func:`trainer_class`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import ADAPTER_FILE
from .errors import CheckpointError, StateError

__all__ = ["ADAPTER_FILE", "EXTRA_FILE", "RandLoraTrainer", "Trainable", "trainer_class", "adapter_file",
           "read_trainable"]

EXTRA_FILE = "randlora_trainable.safetensors"  # parameters trained outside the adapter (e.g. a task head)
ROOT_KEY = "randlora_root"  # EXTRA_FILE's metadata: where the adapter's root sits in the Trainer's model
TRAINING_ARGS = "training_args.bin"  # the names transformers uses for the pickled TrainingArguments
SCHEDULER = "scheduler.pt"           # ... and for the scheduler's state
FULL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
log = logging.getLogger("randlora")

_cache: dict[type, type] = {}


def adapter_file(checkpoint: str | os.PathLike) -> Path:
    """The adapter file of a checkpoint folder written by the Trainer from :func:`trainer_class`."""
    return Path(checkpoint) / ADAPTER_FILE


def _root(model: Any, who: str = "RandLoraTrainer's model"):
    """The module holding ``model``'s adapter, wherever it sits; refuses a model that holds none."""
    from torch import nn

    from .paths import locate

    try:
        found = locate(model) if isinstance(model, nn.Module) else None
    except StateError:  # several adapters: say it for the Trainer, which needs the whole model
        from .paths import roots, examples

        roots = [p or "<the model itself>" for p, _ in roots(model)]
        raise StateError(f"{who} holds {len(roots)} separate RandLora adapters, injected at {examples(roots)}, and "
                         "a checkpoint holds one adapter file. Inject once, on a module that holds every layer to "
                         "adapt (the model itself, with targets naming those layers), or use transformers.Trainer"
                         ) from None
    if found is None:
        what = type(model).__name__
        size = sum(1 for _ in model.modules()) if isinstance(model, nn.Module) else 0
        raise StateError(f"{who} holds no RandLora adapter (searched the {what} and its {max(size - 1, 0)} "
                         "submodules): its checkpoints would hold the whole model, not an adapter. Call "
                         "randlora.inject(model, targets, ...) on the model or any submodule of it before "
                         "building the Trainer, or use transformers.Trainer for a model without an adapter")
    return found[1]


def _extra(model, root) -> dict:
    """The parameters ``model`` trains that the adapter file does not hold (a task head outside the injected
    submodule, a module unfrozen after inject), by path without wrapper components: checkpoints hold them in
    ``EXTRA_FILE`` beside the adapter."""
    from .checkpoint import adapter_tensors
    from .paths import canonical

    held = {id(t) for t in adapter_tensors(root).values()}
    return {canonical(n): p for n, p in model.named_parameters() if p.requires_grad and id(p) not in held}


def _save_extra(extra: dict, path: Path, write: bool, root: str) -> None:
    """Gather the extra parameters (FSDP2 DTensors; every rank) and, on the main process, write them with the
    adapter root's path in the Trainer's model (``root``, dotted; ``""`` for the model itself)."""
    from safetensors.torch import save_file

    from .checkpoint import full_tensor
    from .filefmt import atomic_write

    tensors = {k: full_tensor(p.detach()).to("cpu").contiguous().clone() for k, p in extra.items()}
    if write:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", ROOT_KEY: root}))


def _root_path(model) -> str:
    """The adapter root's path in ``model`` without wrapper components, dotted (``"encoder."``; ``""``: itself)."""
    from .paths import canonical, locate

    path = canonical(locate(model)[0])
    return f"{path}." if path else ""


@dataclass(frozen=True)
class Trainable:
    """A checkpoint folder's ``EXTRA_FILE``: the parameters the Trainer trained beside the adapter."""

    file: Path
    tensors: dict  # name -> tensor, by path in the Trainer's model
    root: str | None  # the adapter root's path in that model, dotted; None in folders written before it was kept

    def place(self, to_target, have) -> tuple[dict[str, str], list[str]]:
        """Each key's name in a target (a model, a weight file) and the keys with no place there.

        Args:
            to_target: a :class:`randlora.paths.PathMap` from the adapter's layer paths to the target's.
            have: the target's parameter names (used only for a folder that did not record the root).

        Returns:
            ``(inside, outside)``: key -> the target's name for the keys whose place the paths give (under the
            adapter's root by ``to_target``; beside it when the target holds the root's surroundings too), and
            the other keys (a head beside the encoder, when the target is the bare encoder).
        """
        if self.root is None:  # the names as they are, where the target has any of them
            hits = any(k in have for k in self.tensors)
            return ({k: k for k in self.tensors} if hits else {}), ([] if hits else list(self.tensors))
        around = self._around(to_target)
        inside, outside = {}, []
        for k in self.tensors:
            rel = k[len(self.root):] if k.startswith(self.root) else None
            if rel is not None and to_target.applies(rel):
                inside[k] = to_target(rel)
            elif rel is None and around is not None and around.applies(k):
                inside[k] = around(k)
            else:
                outside.append(k)
        return inside, outside

    def _around(self, to_target):
        """How names outside the root map when the target holds the root whole (``to_target`` only adds a
        prefix): the Trainer's side before the longest common suffix of the two roots' paths -> the target's."""
        from .paths import PathMap

        if to_target.strip:
            return None
        r, a = self.root.split(".")[:-1], to_target.add.split(".")[:-1]
        k = 0
        while k < min(len(r), len(a)) and r[-1 - k] == a[-1 - k]:
            k += 1
        return PathMap("".join(f"{c}." for c in r[: len(r) - k]), "".join(f"{c}." for c in a[: len(a) - k]))

    def misfit(self, inside: dict[str, str], shapes: dict[str, tuple], where: str, outside: list[str] = ()
               ) -> str | None:
        """Why the tensors do not fit a target, cause first, for an error.

        Args:
            inside: key -> the target's name, from :meth:`place`.
            shapes: the target's names -> shapes.
            where: how the target's tensors are named in the message.
            outside: keys with no place in the target that it must hold all the same (a merged weight file).

        Returns:
            The sentence (placed keys the target lacks, keys of other shapes, ``outside``), or None when they fit.
        """
        from .paths import examples

        missing = [inside[k] for k in inside if inside[k] not in shapes] + list(outside)
        other = [k for k in inside if inside[k] in shapes and shapes[inside[k]] != tuple(self.tensors[k].shape)]
        if not missing and not other:
            return None
        parts = [f"{len(missing)} have no place among {where} (looked for {examples(missing)})"] if missing else []
        if other:
            k = other[0]
            parts.append(f"{len(other)} have other shapes ({inside[k]} is {tuple(self.tensors[k].shape)} in the "
                         f"file, {shapes[inside[k]]} here)")
        return (f"{self.file} holds {len(self.tensors)} parameters trained beside the adapter (e.g. a task head) "
                f"that do not fit: {'; '.join(parts)}")


def read_trainable(path: str | os.PathLike) -> Trainable | None:
    """The ``EXTRA_FILE`` of a checkpoint folder (read with safetensors, never unpickled).

    Args:
        path: a checkpoint folder, or an adapter file (which has none).

    Returns:
        A :class:`Trainable`, or None when ``path`` is not a folder holding ``EXTRA_FILE``.

    Raises:
        CheckpointError: the file is unreadable.
    """
    from .filefmt import read_safetensors

    file = Path(path) / EXTRA_FILE
    if not file.is_file():
        return None
    tensors, meta = read_safetensors(file)
    return Trainable(file, tensors, meta.get(ROOT_KEY))


def _read_extra(folder: str | os.PathLike, extra: dict, what: str) -> dict:
    """``EXTRA_FILE``'s tensors, checked against the parameters the model trains outside the adapter."""
    from .filefmt import read_safetensors
    from .paths import examples

    path = Path(folder) / EXTRA_FILE
    tensors = read_safetensors(path)[0] if path.is_file() else {}
    missing, stray = sorted(set(extra) - set(tensors)), sorted(set(tensors) - set(extra))
    shapes = [k for k in set(extra) & set(tensors) if tuple(tensors[k].shape) != tuple(extra[k].shape)]
    if missing or stray or shapes:
        parts = ([f"{len(missing)} trained parameters outside the adapter are not in it ({examples(missing)})"]
                 * bool(missing) + [f"it holds {len(stray)} the model does not train ({examples(stray)})"]
                 * bool(stray) + [f"{len(shapes)} have other shapes ({examples(sorted(shapes))})"] * bool(shapes))
        raise CheckpointError(f"{what} {folder} does not fit the parameters this model trains besides the adapter: "
                              f"{'; '.join(parts)} ({EXTRA_FILE}); nothing was loaded. Resume with the same "
                              "parameters trainable (requires_grad) as the run that wrote it")
    return tensors


def _full_checkpoint(folder: str | os.PathLike) -> bool:
    """A folder holding whole-model weights (a run without this integration)."""
    return any((Path(folder) / n).is_file() for n in FULL_WEIGHTS)


def _read_adapter(folder: str | os.PathLike, what: str) -> dict:
    """The adapter file's tensors, checked (present, intact) before anything is loaded."""
    from .checkpoint import adapter_path, read_file

    try:
        path = adapter_path(folder)  # the one check of a checkpoint folder, shared with randlora.load
    except CheckpointError as e:
        raise CheckpointError(f"cannot load {what}: {e}. Nothing was loaded; resume from a checkpoint of a run that "
                              "used randlora.hf.RandLoraTrainer") from None
    tensors, _ = read_file(path)
    return tensors


def _z3_params(root, extra: dict) -> list:
    """The adapter's and the extra parameters partitioned by DeepSpeed ZeRO-3 (they carry ``ds_id``), else []."""
    params = [p for n, p in root.named_parameters() if p.requires_grad or "randlora_" in n]
    params += [p for p in extra.values() if all(p is not q for q in params)]
    return params if any(hasattr(p, "ds_id") for p in params) else []


def _gathered(root, extra: dict, modify: bool = False):
    """Under ZeRO-3 the adapter's parameters whole on every rank (a collective; rank 0's edits are kept)."""
    params = _z3_params(root, extra)
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


class _Mixin:
    """What :func:`trainer_class` adds to a ``Trainer`` class (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from torch import nn

        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, nn.Module):  # refuse before the Trainer moves or wraps anything
            _root(model)
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._check_model()  # a model from model_init, or one a subclass loaded
        self._refuse_unsupported()

    def _check_model(self):
        return _root(self.model)  # type: ignore[attr-defined]

    def _extra(self) -> dict:
        return _extra(self.model, self._adapter_root())  # type: ignore[attr-defined]

    # -- what this class cannot write adapter-only -------------------------------------------------
    def _refuse_unsupported(self) -> None:
        from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

        cause = None
        if is_torch_xla_available():
            cause = "XLA/TPU runs save through save_tpu_checkpoint, which writes the whole model"
        elif is_sagemaker_mp_enabled():
            cause = "SageMaker model parallel saves through smp, which writes the whole model"
        elif self.is_fsdp_enabled:  # type: ignore[attr-defined]
            plugin = self.accelerator.state.fsdp_plugin  # type: ignore[attr-defined]
            if getattr(plugin, "fsdp_version", 1) != 2:
                cause = ("FSDP1 (fsdp_config version 1) shards parameters into flat buffers that the adapter "
                         "cannot be gathered from; set fsdp_config={'version': 2} (FSDP2, transformers' default)")
        elif self.is_deepspeed_enabled and not callable(  # type: ignore[attr-defined]
                getattr(super(), "_prepare_for_training", None)):
            cause = ("this transformers has no Trainer._prepare_for_training, where resuming under DeepSpeed is "
                     "routed; use transformers 5.x (tested: 5.24)")
        if cause:
            raise StateError(f"RandLoraTrainer cannot write adapter-only checkpoints here: {cause}. Train one "
                             "process, DDP, FSDP2 or DeepSpeed ZeRO, or use transformers.Trainer and "
                             "randlora.save(model, path) after training")

    def _adapter_root(self):
        return _root(self.model)  # type: ignore[attr-defined]

    # -- writing ---------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:  # type: ignore[override]
        self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:  # type: ignore[attr-defined]
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)  # type: ignore[attr-defined]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:  # type: ignore[override]
        """Every rank gathers (FSDP2 DTensors, ZeRO-3 partitions); the main process writes the adapter file.
        A ``state_dict`` passed in (Trainer's whole-model one) is not written."""
        import torch

        from .checkpoint import save, state_dict as adapter_state

        output_dir = output_dir if output_dir is not None else self.args.output_dir  # type: ignore[attr-defined]
        root, extra = self._adapter_root(), self._extra()
        write = self.args.should_save  # type: ignore[attr-defined]
        with _gathered(root, extra):
            if write:
                os.makedirs(output_dir, exist_ok=True)
            if extra:
                where = _root_path(self.model)  # type: ignore[attr-defined]
                _save_extra(extra, Path(output_dir) / EXTRA_FILE, write, where)
            if not write:
                adapter_state(root, save_projection=False)  # the same gathers as save() on the main process
                return
            save(root, Path(output_dir) / ADAPTER_FILE, save_projection=False)
        if getattr(self, "processing_class", None) is not None:
            self.processing_class.save_pretrained(output_dir)  # type: ignore[attr-defined]
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS))  # type: ignore[attr-defined]

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:  # type: ignore[override]
        """Under FSDP2 and DeepSpeed, Trainer's own version also writes the model through the engine; here
        only the optimiser (and scheduler) is written."""
        if self.is_fsdp_enabled:  # type: ignore[attr-defined]
            from accelerate.utils import save_fsdp_optimizer

            save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator,  # type: ignore[attr-defined]
                                self.optimizer, self.model, output_dir)  # type: ignore[attr-defined]
            self._save_scheduler(output_dir)
        elif self.is_deepspeed_enabled:  # type: ignore[attr-defined]
            # optimiser partitions, fp32 master copies and the trainable parameters: no frozen weights
            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)  # type: ignore[attr-defined]
            from accelerate.utils import DeepSpeedSchedulerWrapper

            if not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):  # type: ignore[attr-defined]
                self._save_scheduler(output_dir)  # the engine saved its own scheduler otherwise
        else:
            super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]

    def _save_scheduler(self, output_dir: str) -> None:
        import warnings

        import torch

        if self.args.should_save:  # type: ignore[attr-defined]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's "please also save the optimizer" notice
                state = self.lr_scheduler.state_dict()  # type: ignore[attr-defined]
                torch.save(state, os.path.join(output_dir, SCHEDULER))

    # -- reading ---------------------------------------------------------------------------------
    def _load_adapter(self, folder: str | os.PathLike, what: str) -> None:
        """The adapter file and the other trained parameters (``EXTRA_FILE``), all checked before any is loaded."""
        import torch

        from .checkpoint import copy_into, load_state_dict

        root, extra = self._adapter_root(), self._extra()
        tensors = _read_adapter(folder, what)
        others = _read_extra(folder, extra, what)
        with _gathered(root, extra, modify=True):
            load_state_dict(root, tensors)
            with torch.no_grad():
                for k, p in extra.items():
                    copy_into(p, others[k])

    def _legacy(self, folder: str | os.PathLike) -> bool:
        """A folder of a run without this integration (whole-model weights, no adapter file), one process or
        DDP: Trainer's own loader reads it. Later checkpoints of this run are adapter-only all the same."""
        engine = self.is_fsdp_enabled or self.is_deepspeed_enabled  # type: ignore[attr-defined]
        legacy = not engine and not adapter_file(folder).is_file() and _full_checkpoint(folder)
        if legacy:
            log.warning("randlora: %s holds whole-model weights and no %s (a run without RandLoraTrainer); "
                        "loading it with Trainer's own loader", folder, ADAPTER_FILE)
        return legacy

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:  # type: ignore[override]
        if self._legacy(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        self._load_adapter(resume_from_checkpoint, "the checkpoint")

    def _load_best_model(self) -> None:  # type: ignore[override]
        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        if self._legacy(best):
            return super()._load_best_model()  # type: ignore[misc]
        _read_adapter(best, "the best checkpoint")  # checked before the engine loads anything
        _read_extra(best, self._extra(), "the best checkpoint")
        if self.is_deepspeed_enabled:  # type: ignore[attr-defined]
            self._load_engine(best)
        self._load_adapter(best, "the best checkpoint")

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):  # type: ignore[override]
        """Under DeepSpeed Trainer resumes with a strict load of the engine's module state, which holds only
        the trainable parameters here; this class loads the engine's state itself, then the adapter file."""
        self._check_model()  # train() may have made a new model (model_init), or parameters were unfrozen
        if not self.is_deepspeed_enabled or resume_from_checkpoint is None:  # type: ignore[attr-defined]
            return super()._prepare_for_training(  # type: ignore[misc]
                max_steps, train_dataloader, resume_from_checkpoint)
        _read_adapter(resume_from_checkpoint, "the checkpoint")  # checked before anything is loaded
        _read_extra(resume_from_checkpoint, self._extra(), "the checkpoint")
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)  # type: ignore[misc]
        self._load_engine(resume_from_checkpoint)
        self._load_adapter(resume_from_checkpoint, "the checkpoint")
        self._load_optimizer_and_scheduler(resume_from_checkpoint)  # type: ignore[attr-defined]
        self._load_scaler(resume_from_checkpoint)  # type: ignore[attr-defined]
        return model, train_dataloader

    def _load_engine(self, folder: str) -> None:
        """DeepSpeed's checkpoint: optimiser partitions, fp32 master copies, trainable parameters."""
        if not any(Path(folder).glob("global_step*")):
            raise CheckpointError(f"{folder} holds no DeepSpeed checkpoint (global_step*/): it was written with "
                                  "save_only_model=True or without DeepSpeed, so the optimiser cannot be restored; "
                                  "nothing was loaded. Resume from a checkpoint of a DeepSpeed run")
        path, _ = self.model_wrapped.load_checkpoint(folder, load_module_strict=False,  # type: ignore[attr-defined]
                                                     load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {folder} (see its log above)")


def trainer_class(base: type | None = None) -> type:
    """A subclass of ``base`` (default ``transformers.Trainer``; any subclass such as TRL's ``SFTTrainer``
    works) whose checkpoints hold just the RandLora adapter file.

    Args:
        base: the Trainer class to extend.

    Returns:
        The subclass (cached per ``base``). Building it refuses (:class:`randlora.StateError`) a model that
        holds no RandLora adapter, and set-ups it cannot write adapter-only (FSDP1, XLA, SageMaker MP).

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
