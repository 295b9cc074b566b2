"""Adapter checkpoints: the adapter's state dict, and single ``.safetensors`` files (atomic writes).

Keys: ``<module path>.randlora_lambda`` / ``.randlora_gamma`` per layer, ``<path>.bias`` for trained
biases, ``randlora_fingerprint`` (see :class:`randlora.bank.Fingerprint`) and, with
``save_projection=True``, the shared bases ONCE as ``randlora_A`` ``(r, m_g)`` / ``randlora_B`` ``(M_g, n_g, r)``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .bank import BASES, FP, bases_checksum, stored_bases
from .recipes import n_bases
from .selection import is_conv1d
from .errors import CheckpointError, ConfigError, StateError, TargetError
from .paths import (PathMap, canonical, compiled_inner, depth_difference, examples, locate,
                    match_paths, on_root)
from .named import drop
from .filefmt import atomic_write, decode_bases, digest, encode_bases, file_bases, read_safetensors
from .experts import adapted_parameters
from .selection import adaptable_paths, held_parameters, matrix_shape, target_module
from .walker import (AdapterConfig, adapt, adapted_weights, bank_of, biases, config_of, eject,
                     registry_of, require_bank)

__all__ = ["state_dict", "load_state_dict", "save", "load", "read_file", "adapter_path",
           "adapter_tensors", "full_tensor", "copy_into", "FORMAT", "ADAPTER_FILE"]

FORMAT = "randlora"
ADAPTER_FILE = "randlora_adapter.safetensors"  # the adapter file in a Trainer checkpoint folder (randlora.hf)
log = logging.getLogger("randlora")
DIGEST = "sha256"  # metadata key: checksum of all stored tensors (files from 0.1.0 have none and are not checked)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a sharded one (``DTensor``, e.g. under FSDP2) is gathered first (a collective)."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


@on_root
def state_dict(model: nn.Module, *, save_projection: bool = True, name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors (``λ``, ``γ``, trained biases, fingerprint; bases once if ``save_projection``).

    On a sharded (FSDP2) model this gathers: call it on every rank.

    Args:
        model: a model adapted by :func:`randlora.inject`.
        save_projection: also return the shared bases, once, as ``randlora_A`` / ``randlora_B`` (then the
            checkpoint loads into a model whatever its seed and recipe).
        name: the adapter (default: the active one); its keys are ``<path>.randlora_lambda`` /
            ``.randlora_gamma`` whatever its name.

    Returns:
        A dict of name -> tensor (detached; sharded parameters gathered), for :func:`load_state_dict`.

    Raises:
        StateError: the model has no RandLora adapter, or no adapter ``name``.
    """
    bank = require_bank(model)
    sd: dict[str, torch.Tensor] = {}
    for k, t in adapter_tensors(model, name).items():
        sd[k] = full_tensor(t.detach())
    if save_projection:
        sd["randlora_A"], sd["randlora_B"] = bank.A.detach(), bank.B.detach()
    sd[FP] = bank.fingerprint.to_tensor()
    return sd


def adapter_tensors(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The live tensors an adapter file holds for ``model`` (the root): ``λ``/``γ`` of adapter ``adapter`` and
    the trained biases, by the keys files use."""
    adapter = registry_of(model).resolve(adapter)
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapted_weights(model):  # (an adapted parameter by its own path: λ (E, r, n), γ (E, n, m))
        ad = layer.adapter(adapter)
        if ad is not None:
            out[f"{name}.randlora_lambda"], out[f"{name}.randlora_gamma"] = ad.randlora_lambda, ad.randlora_gamma
    for name, p in biases(model):
        if p.requires_grad:
            out[canonical(name)] = p
    return out


def copy_into(dest: torch.Tensor, src: torch.Tensor) -> None:
    """``dest.copy_(src)``; a sharded (``DTensor``) ``dest`` keeps its own part of ``src``."""
    mesh = getattr(dest, "device_mesh", None)
    if mesh is not None:  # a sharded (DTensor) parameter: keep this rank's part of the full tensor
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(device=dest.device, dtype=dest.dtype), mesh, dest.placements)
    dest.copy_(src)


@on_root
def load_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True,
                    name: str | None = None, prefix: object = None) -> None:
    """Restore an adapter state dict into adapter ``name``, all or nothing.

    Without bases the checkpoint's fingerprint must equal the model bank's; with bases, seed, recipe,
    mode and shapes must agree and the stored bases (verified against their checksum) are copied in.
    Everything is checked before anything is written: on an error the model is left as it was.

    Args:
        model: a model adapted by :func:`randlora.inject`, not merged.
        state: a dict from :func:`state_dict` or :func:`read_file`.
        strict: refuse missing and unexpected keys (otherwise the keys present are loaded).
        name: the adapter to load into (default: the active one).
        prefix: how the checkpoint's layer paths map onto the model's, ``(FROM, TO)``: strip ``FROM``, put ``TO``
            in front. By default the exact paths, else the unique prefix added or stripped that maps them all
            (an adapter saved from a wrapper, a compiled or a DDP-wrapped model loads into the bare model).

    Returns:
        None; the adapter's ``λ``, ``γ``, trained biases and (when ``state`` holds them) the bases are replaced.

    Raises:
        CheckpointError: ``state`` is not a dict of tensors, has wrong keys, dtypes or shapes, or holds bases
            that do not match its own checksum or fingerprint (a corrupt checkpoint).
        FingerprintMismatch: ``state`` has no bases and was made with other bases than the model's, or has
            neither bases nor fingerprint.
        StateError: the model has no RandLora adapter, no adapter ``name``, or is merged.
    """
    bank = require_bank(model)
    _check_entries(state)
    if any(l.merged for _, l in adapted_weights(model)):
        raise StateError("the model is merged: loading would change the ΔW folded into its weights, and unmerge "
                         "would then corrupt them; nothing was loaded. Call randlora.unmerge(model) first")
    dest = adapter_tensors(model, name)
    state = _renamed(state, _state_map(state, dest, strict, prefix))
    problems, fix = _layout_problems(state, dest, model, strict)
    if problems:
        raise CheckpointError(f"{'; '.join(problems)}; nothing was loaded. {fix}.")
    _verify_bases(state, bank)
    _copy_state(state, dest, bank)


_PARAMS = (".randlora_lambda", ".randlora_gamma")


def _layer_paths(keys) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in keys if k.endswith(_PARAMS)}


def _state_map(state: Mapping[str, torch.Tensor], dest: Mapping[str, torch.Tensor], strict: bool,
               prefix: object) -> PathMap:
    """The matching rule (:func:`randlora.paths.match_paths`) between the checkpoint's layers and the model's."""
    try:
        return match_paths(_layer_paths(state), _layer_paths(dest), prefix=prefix,
                           model_desc="the model's adapted layers", partial=True)
    except CheckpointError:
        if strict or prefix is not None:
            raise
        return PathMap()  # strict=False: the keys present are loaded as they are


def _renamed(state: Mapping[str, torch.Tensor], pm: PathMap) -> Mapping[str, torch.Tensor]:
    if pm.identity:
        return state
    return {k if k in BASES or k == FP else pm(k): v for k, v in state.items()}


def _has_bases(state: Mapping[str, torch.Tensor]) -> bool:
    return all(b in state for b in BASES)


def _check_entries(state: object) -> None:
    """``state`` must be a mapping of str names to tensors."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"expected a dict of name -> tensor (from randlora.state_dict), got {type(state).__name__}")
    odd = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"checkpoint entries {odd[:5]!r} are not (str name -> torch.Tensor) pairs; nothing "
                              "was loaded. Pass the dict randlora.state_dict / randlora.read_file returns")


_FIX_WIDTH = "Load it into the base model it was trained on"
_FIX_R = ("Inject with the same targets and r as the file, or call randlora.load on a plain model (it injects with "
          "the file's settings)")
_FIX_KEYS = ("Load it into the model it was trained on, inject with the same targets, or pass strict=False to load "
             "the tensors present")


def _layout_problems(state: Mapping[str, torch.Tensor], dest: dict[str, torch.Tensor], model: nn.Module,
                     strict: bool) -> tuple[list[str], str]:
    """Every way the checkpoint's dtypes, keys and shapes do not fit the model, so one error names them all
    (cause first), and the fix the first one calls for."""
    dtypes = _dtype_problems(state, dest)
    shapes, fix = _shape_problems(state, dest, model)
    return dtypes + shapes + _key_problems(state, dest, strict), (fix if fix and not dtypes else _FIX_KEYS)


def _dtype_problems(state: Mapping[str, torch.Tensor], dest: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    if FP in state and (state[FP].dim() != 1 or state[FP].dtype != torch.int64):
        problems.append(f"{FP} must be a 1-D int64 tensor, got {state[FP].dtype} of shape "
                        f"{tuple(state[FP].shape)} (a corrupt checkpoint)")
    ints = sorted(k for k in (set(dest) | set(BASES)) & set(state) if not state[k].is_floating_point())
    if ints:
        problems.append(f"{len(ints)} tensors ({examples(ints)}) hold {state[ints[0]].dtype} values where "
                        "floating point is required")
    return problems


def _key_problems(state: Mapping[str, torch.Tensor], dest: dict[str, torch.Tensor], strict: bool) -> list[str]:
    if not strict:
        return []
    missing = sorted(set(dest) - set(state))
    unexpected = sorted(set(state) - set(dest) - set(BASES) - {FP})
    theirs, ours = _layer_paths(state), _layer_paths(dest)
    depth = ((depth_difference(theirs, ours) if unexpected else None)
             or (depth_difference(ours, theirs, words=("this model's adapter", "the file")) if missing else None))
    problems = [depth] if depth else []
    if missing:
        problems.append(f"{len(missing)} missing keys (the model's adapter tensors not in the checkpoint: "
                        f"{examples(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (checkpoint tensors with no place in the model: "
                        f"{examples(unexpected)})")
    return problems


def _shape_problems(state: Mapping[str, torch.Tensor], dest: dict[str, torch.Tensor], model: nn.Module
                    ) -> tuple[list[str], str | None]:
    """Shape mismatches, the cause behind λ/γ ones first; and that cause's fix (None: no λ/γ mismatch)."""
    bank = require_bank(model)
    bad = [k for k in sorted(set(dest) & set(state)) if tuple(state[k].shape) != tuple(dest[k].shape)]
    cause, fix = _width_problem(state, dest, bad, model)
    problems = [cause] if cause else []
    if problems:
        bad = [k for k in bad if not k.endswith(_PARAMS)]
    if bad:
        problems.append(f"{len(bad)} tensors have other shapes than the model's: "
                        + ", ".join(f"{k} is {tuple(state[k].shape)} in the checkpoint, {tuple(dest[k].shape)} here"
                                    for k in bad[:2]) + (f" and {len(bad) - 2} more" if len(bad) > 2 else ""))
    if any(b in state for b in BASES) and not _has_bases(state):
        problems.append("the checkpoint holds only one of randlora_A / randlora_B")
    if _has_bases(state):
        for b, t in zip(BASES, (bank.A, bank.B)):
            if tuple(state[b].shape) != tuple(t.shape):
                problems.append(f"{b}: checkpoint shape {tuple(state[b].shape)}, model bank {tuple(t.shape)}")
    return problems, fix


def _width_problem(state: Mapping[str, torch.Tensor], dest: dict[str, torch.Tensor], bad: list[str],
                   model: nn.Module) -> tuple[str | None, str | None]:
    """The cause behind λ/γ of other shapes, and its fix: layers of other widths (γ is ``(n, min(O, I))``), or
    another ``r``; ``(None, None)`` when λ/γ fit."""
    params = {p for p, _ in adapted_parameters(model)}  # (their shapes are compared key by key)
    gam = [k for k in sorted(set(dest) & set(state)) if k.endswith(".randlora_gamma") and state[k].dim() == 2
           and k[: -len(".randlora_gamma")] not in params]
    rows = [(k[: -len(".randlora_gamma")], tuple(state[k].shape), tuple(dest[k].shape)) for k in gam]
    cause = width_cause([(p, _dims(model.get_submodule(p)), a, b) for p, a, b in rows if a[1:] != b[1:]], len(rows))
    if cause:
        return cause, _FIX_WIDTH
    lam = [k for k in bad if k.endswith(".randlora_lambda") and state[k].dim() == 2]
    if lam:
        k = lam[0]
        return (f"the adapter was made with r={state[k].shape[0]}, this model's adapter has r={dest[k].shape[0]} "
                f"(λ shape {tuple(state[k].shape)} in the file, {tuple(dest[k].shape)} here; {len(lam)} layers "
                f"differ, e.g. {k[: -len('.randlora_lambda')]})", _FIX_R)
    return None, None


def width_cause(wide: list[tuple[str, tuple[int, int], tuple, tuple]], total: int) -> str | None:
    """How the model's layers are narrower or wider than the adapter's, said first in a wrong model's error.

    Args:
        wide: the layers whose widths differ: ``(path, the model's (O, I), γ shape in the adapter, γ shape the
            model's layer has)`` (``γ`` is ``(n, min(O, I))``).
        total: how many layers were compared.

    Returns:
        The sentence, or None when ``wide`` is empty.
    """
    if not wide:
        return None
    here, there = [b[1] for _, _, _, b in wide], [a[1] for _, _, a, _ in wide]
    how = ("narrower" if all(h < t for h, t in zip(here, there)) else
           "wider" if all(h > t for h, t in zip(here, there)) else "of other widths")
    path, (O, I), a, b = wide[0]
    return (f"the model's layers are {how} than the adapter's: {path} is ({O}, {I}) here, min(out, in) = {a[1]} "
            f"in the file (γ shape {a}, here {b}; {len(wide)} of {total} layers differ)")


def _dims(layer: nn.Module) -> tuple[int, int]:
    """A linear layer's ``(out, in)``: an adapted, ``nn.Linear`` or quantised layer says it, a ``Conv1D`` stores
    its weight ``(in, out)``."""
    if is_conv1d(layer):
        return int(layer.weight.shape[1]), int(layer.weight.shape[0])
    if not hasattr(layer, "out_features"):  # a convolution's kernel matrix, an attention module's in_proj
        return matrix_shape(layer)
    return int(layer.out_features), int(layer.in_features)


def _verify_bases(state: Mapping[str, torch.Tensor], bank) -> None:
    """The checkpoint must name this model's bases (fingerprint) or carry intact ones (:func:`stored_bases`).

    When the fingerprint names exactly this model's bases, stored bases are compared with the bank itself, in
    the bank's dtype: a bf16/fp16 model's state dict holds its rounded bases, which no float32 checksum names.
    """
    meta = bank.A.is_meta  # (a model on the meta device: its bank is made from the seed on first use)
    if meta and _has_bases(state) and (FP not in state or bank.fingerprint.differences(state[FP])):
        raise CheckpointError("the checkpoint carries bases other than this model's seed makes, and the model is on "
                              "the meta device, where they cannot be kept; nothing was loaded. Load it after "
                              "model.to_empty(device=...)")
    if FP in state and _has_bases(state) and not bank.fingerprint.differences(state[FP]):
        if meta:  # the seed's bases, which the bank makes on first use: only the file's own checksum to check
            stored_bases(state)
            return
        if not all(torch.equal(state[k].to(t), t) for k, t in zip(BASES, (bank.A, bank.B))):
            raise CheckpointError("the checkpoint's bases differ from the ones its fingerprint names: the file is "
                                  "corrupt; nothing was loaded. Save it again, or drop randlora_A/randlora_B from it")
        return
    stored = stored_bases(state)
    if FP not in state:
        return
    diff = bank.fingerprint.differences(state[FP])
    if diff and not (stored is not None and all(d.startswith("checksum") for d in diff)):
        bank.check(state[FP])


def _copy_state(state: Mapping[str, torch.Tensor], dest: dict[str, torch.Tensor], bank) -> None:
    """Write the checked checkpoint into the adapter's tensors (and the bank, when it holds bases)."""
    with torch.no_grad():
        for k, t in dest.items():
            if k in state:
                copy_into(t, state[k])
        if _has_bases(state) and not bank.A.is_meta:
            ck = int(state[FP][-1]) if FP in state else bases_checksum(state["randlora_A"], state["randlora_B"])
            bank.load_(state["randlora_A"], state["randlora_B"], ck)


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
@on_root
def save(model: nn.Module, path: str | os.PathLike, *, save_projection: bool = True,
         name: str | None = None) -> Path:
    """Write an adapter to one ``.safetensors`` file (settings in its metadata), atomically.

    On a sharded (FSDP2) model call it on every rank (it gathers).

    Args:
        model: a model adapted by :func:`randlora.inject`.
        path: the file to write; its folder is created, an existing file is replaced only once the new one
            is complete.
        save_projection: also store the shared bases (losslessly compacted), so the file loads whatever the
            seed and recipe; without them the file is small and loads into models with the same bases.
        name: the adapter (default: the active one).

    Returns:
        The path written.

    Raises:
        CheckpointError: ``path`` is a directory.
        StateError: the model has no RandLora adapter, or no adapter ``name``.
    """
    from safetensors.torch import save_file

    tensors, meta = _file_contents(model, save_projection, name)
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass a file path such as {path / 'adapter.safetensors'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def _file_contents(model: nn.Module, save_projection: bool, name: str | None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (CPU copies; bases encoded) and the metadata (format, settings, digest) of an adapter file."""
    bank = require_bank(model)
    sd = state_dict(model, save_projection=False, name=name)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    meta = {"format": FORMAT, "version": "1", "config": json.dumps(config_of(model, name).to_dict())}
    if save_projection:
        bt, bm = encode_bases(*file_bases(bank))
        tensors.update(bt)
        meta.update(bm)
    meta[DIGEST] = digest(tensors)
    return tensors, meta


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], AdapterConfig]:
    """Read one of this library's adapter files (never unpickles).

    Args:
        path: a file written by :func:`save`.

    Returns:
        ``(tensors, settings)``: the adapter's tensors with the bases decoded to float32 (a dict
        :func:`load_state_dict` takes), and the :class:`AdapterConfig` it was saved with.

    Raises:
        CheckpointError: ``path`` is missing, not a safetensors file, not a randlora adapter, fails its
            checksum, or holds unreadable settings or bases.
    """
    path = adapter_path(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a randlora adapter (no randlora metadata); "
                              "for a peft adapter folder use randlora.load_peft")
    if DIGEST in meta and digest(tensors) != meta[DIGEST]:
        raise CheckpointError(f"{path} is corrupt: its tensors do not match the checksum stored when it was saved "
                              "(a flipped or truncated byte); nothing was loaded. Use an intact copy of the file")
    config = _file_config(path, meta)
    try:
        decode_bases(tensors, meta)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} has bases with an unreadable encoding ({e}); the file is corrupt") from None
    return tensors, config


def adapter_path(path: str | os.PathLike) -> Path:
    """The adapter file ``path`` names: the file itself, or a Trainer checkpoint folder's ``ADAPTER_FILE``.

    Raises:
        CheckpointError: nothing is there, or a folder that holds no adapter file (a peft folder is named).
    """
    path = Path(path)
    if path.is_dir():
        inner = path / ADAPTER_FILE
        if inner.is_file():
            log.info("randlora: reading %s", inner)
            return inner
        names = sorted(p.name for p in path.iterdir())
        hint = ("it is a peft adapter folder: use randlora.load_peft" if "adapter_config.json" in names else
                f"it holds {len(names)} entries ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); "
                "pass an adapter file written by randlora.save, or a checkpoint folder of randlora.hf.RandLoraTrainer")
        raise CheckpointError(f"the folder {path} holds no {ADAPTER_FILE}: {hint}")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass an adapter file written by randlora.save or a checkpoint "
                              "folder of randlora.hf.RandLoraTrainer")
    return path


def _file_config(path: Path, meta: dict[str, str]) -> AdapterConfig:
    try:
        return AdapterConfig.from_dict(json.loads(meta["config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has unreadable adapter settings ({e}); the file is corrupt or not from "
                              "this library: save the adapter again") from None


def load(model: nn.Module, path: str | os.PathLike, *, name: str | None = None, prefix: object = None) -> nn.Module:
    """Load an adapter file or a Trainer checkpoint folder, all or nothing.

    On a plain model this first injects with the file's settings, on the module the adapter was trained on
    (the file's layer paths are matched to the model's by :func:`randlora.paths.match_paths`: an adapter
    saved from a wrapper loads into the bare model and the other way round); on an injected model without
    adapter ``name`` it adds that adapter (sharing the bank). A checkpoint folder of
    ``randlora.hf.RandLoraTrainer`` also restores the parameters trained beside the adapter
    (``randlora_trainable.safetensors``, e.g. a task head) where ``model`` has them; those trained outside
    ``model`` (the head, when ``model`` is the bare encoder) are skipped. A folder with that file logs, at
    WARNING on the ``randlora`` logger, the files it loaded and any tensors it skipped. On any error the
    model is left as it was.

    Args:
        model: a plain model, or one holding an adapter made by :func:`randlora.inject` (anywhere inside it).
        path: a file written by :func:`save`, or a checkpoint folder of ``randlora.hf.RandLoraTrainer``.
        name: the adapter to load into (default: the active one, or ``"default"`` on a plain model).
        prefix: ``(FROM, TO)`` to map the file's layer paths explicitly (strip ``FROM``, put ``TO`` in front).

    Returns:
        ``model``.

    Raises:
        CheckpointError: an unreadable or corrupt file, one whose layers do not fit the model (the message
            names what differs first: the layers' widths, the model's depth), or a folder whose
            ``randlora_trainable.safetensors`` belongs in the model but does not fit its parameters.
        FingerprintMismatch: the file has no bases and was made with other bases than the model's.
        StateError: the model is merged.
    """
    from .hf import read_trainable

    tensors, cfg = read_file(path)
    trained = read_trainable(path)
    found = locate(model)
    root = compiled_inner(model) if found is None else found[1]
    bank = bank_of(root)
    if bank is not None and (name is None or name in bank.registry.adapters):
        plan = _trained_plan(model, root, trained)
        load_state_dict(root, tensors, name=name, prefix=prefix)
    else:
        root, tensors, targets = _placed(root, bank, tensors, cfg, prefix)
        plan = _trained_plan(model, root, trained)
        _adapt_and_load(root, bank, tensors, cfg, targets, name, path)
    _restore_trained(plan, trained)
    return model


def _placed(root: nn.Module, bank, tensors: dict[str, torch.Tensor], cfg: AdapterConfig, prefix: object
            ) -> tuple[nn.Module, dict[str, torch.Tensor], tuple[str | None, list[str] | None]]:
    """Where a file's adapter goes in a module that does not hold it yet: the root (the submodule the file's
    paths name, on a plain model), the tensors keyed by paths under it, and ``(targets as one regex,
    target_parameters as full names)`` (None where the file has none)."""
    linear, have = _placeable(root)
    pm = match_paths(cfg.targets + cfg.target_parameters, have, prefix=prefix,
                     widths=_widths(root, linear, tensors, cfg))
    if bank is None and pm.add and not pm.strip:  # the adapter belongs to a submodule: inject there
        root = compiled_inner(next(m for n, m in root.named_modules() if canonical(n) == pm.add[:-1]))
        pm, (linear, have) = PathMap(), _placeable(root)
    targets = "|".join(re.escape(linear[pm(t)]) for t in cfg.targets) or None
    params = [have[pm(t)] for t in cfg.target_parameters] or None
    return root, dict(_renamed(tensors, pm)), (targets, params)


def _placeable(root: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """``{canonical: real path}`` of ``root``'s linear layers, and of those plus its 2-D/3-D parameters."""
    linear = adaptable_paths(root)  # (convolutions and attention in_proj included)
    params = {canonical(n): n for n, m, k in held_parameters(root) if m._parameters[k].dim() in (2, 3)}
    return linear, {**params, **linear}


def _widths(root: nn.Module, linear: dict[str, str], tensors: Mapping[str, torch.Tensor], cfg: AdapterConfig):
    """For the error of :func:`match_paths`: the sentence naming the layers a map reaches whose widths differ
    from the file's (``γ`` is ``(n, min(O, I))``), or None."""

    def widths(pm: PathMap) -> str | None:
        rows = []
        for t in cfg.targets:
            g = tensors.get(f"{t}.randlora_gamma")
            if g is not None and g.dim() == 2 and pm.applies(t) and pm(t) in linear:
                O, I = _dims(target_module(root, linear[pm(t)]))
                rows.append((pm(t), (O, I), tuple(g.shape), (n_bases(min(O, I), cfg.r), min(O, I))))
        return width_cause([r for r in rows if r[2][1:] != r[3][1:]], len(rows))

    return widths


def _adapt_and_load(root: nn.Module, bank, tensors: dict[str, torch.Tensor], cfg: AdapterConfig,
                    targets: tuple[str | None, list[str] | None], name: str | None, path) -> None:
    """Inject the file's adapter (or add it as ``name``) and load it; a failed load takes the injection back."""
    try:
        adapt(root, targets[0], cfg, name=name, target_parameters=targets[1])
    except (TargetError, ConfigError) as e:
        raise CheckpointError(f"the adapter in {path} does not fit this model: {e}") from None
    try:
        load_state_dict(root, tensors, name=name)
    except Exception:
        if bank is None:
            eject(root)
        else:
            drop(root, name)  # type: ignore[arg-type]
        raise


def _trained_plan(model: nn.Module, root: nn.Module, trained) -> tuple[list, list[str]]:
    """The parameters of ``model`` a checkpoint folder's trained-beside-the-adapter file restores, each with
    its tensor, and the file's keys trained outside ``model`` (skipped); checked before anything is loaded.

    Raises:
        CheckpointError: keys that belong in ``model`` but name none of its parameters, or other shapes.
    """
    if trained is None:
        return [], []
    params = {canonical(n): p for n, p in model.named_parameters()}
    at = next(canonical(n) for n, m in model.named_modules() if m is root)
    inside, outside = trained.place(PathMap(add=f"{at}." if at else ""), params)
    problems = trained.misfit(inside, {k: tuple(p.shape) for k, p in params.items()}, "this model's parameters")
    if problems:
        raise CheckpointError(f"{problems}; nothing was loaded. Load the folder into the model the Trainer trained "
                              f"(the same class, with its head), or load the adapter alone: randlora.load(model, "
                              f"'{trained.file.parent / ADAPTER_FILE}')")
    return [(params[t], trained.tensors[k]) for k, t in inside.items()], outside


def _restore_trained(plan: tuple[list, list[str]], trained) -> None:
    """Copy the checked tensors of :func:`_trained_plan` in, and say what was loaded (INFO) and what was skipped
    (WARNING)."""
    if trained is None:
        return
    pairs, skipped = plan
    with torch.no_grad():
        for p, t in pairs:
            copy_into(p, t)
    loaded, n = [k for k in trained.tensors if k not in skipped], len(trained.tensors)
    parts = [ADAPTER_FILE] + ([f"{len(loaded)} of the {n} tensors of {trained.file.name} ({examples(loaded)})"]
                              if loaded else [])
    msg = f"randlora: loaded from the checkpoint folder {trained.file.parent}: {' and '.join(parts)}"
    if skipped:
        msg += (f"; NOT loaded: {len(skipped)} of the {n} tensors of {trained.file.name} ({examples(skipped)}), "
                "trained outside the part of the Trainer's model this model holds, so it differs from the trained "
                "model there. Load the folder into the whole model the Trainer trained (e.g. the wrapper with its "
                "head) to restore them")
    (log.warning if skipped else log.info)(msg)  # a complete load is the expected case: visible at INFO
