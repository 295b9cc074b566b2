"""Read and write ``peft`` RandLora adapter folders without importing ``peft``.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<path>.randlora_lambda`` ``(r, n)`` / ``.randlora_gamma`` ``(n, m)``, trained biases
(``<path>.base_layer.bias`` on adapted layers, ``<path>.bias`` elsewhere) and, with ``save_projection``,
the shared bases ``base_model.randlora_A`` ``(r, 1, m_g)`` / ``base_model.randlora_B`` ``(M_g, n_g, r)``
(peft also writes one copy of them per adapted layer). This library's layer math uses peft's exact
pairing of ``B`` columns with ``(k, i)`` rows, so ``λ``/``γ`` load unchanged with ``recipe="peft"``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, StateError
from .bank import bases_checksum
from .recipes import BankShape, bank_shape, generate
from .peft_format import CONFIG_FILE, KEY_PREFIX, PEFT_VERSION, WEIGHTS_FILE, bias_key, is_folder, target_modules, write_folder
from .registry import BIAS_MODES
from .paths import canonical, compiled_inner, linear_paths, locate, match_paths, on_root
from .experts import refuse_parameters
from .selection import refuse_kinds
from .walker import (AdapterConfig, adapted_layers, biases, config_of, eject, inject, is_conv1d, is_linear,
                     require_bank)

__all__ = ["load_peft", "save_peft", "read_peft", "is_peft_folder", "PEFT_CONFIG", "PEFT_WEIGHTS"]

PEFT_CONFIG, PEFT_WEIGHTS, PREFIX = CONFIG_FILE, WEIGHTS_FILE, KEY_PREFIX
SHARED = ("base_model.randlora_A", "base_model.randlora_B")


is_peft_folder = is_folder


def _mode(cfg: dict) -> str:
    # peft checks very_sparse first: it wins when both flags are set
    if cfg.get("very_sparse"):
        return "very_sparse"
    return "sparse" if cfg.get("sparse") else "dense"


def _check_config(cfg: dict, folder: Path) -> None:
    problems = []
    if cfg.get("peft_type") != "RANDLORA":
        raise CheckpointError(f"{folder} holds a peft adapter of type {cfg.get('peft_type')!r}, not RANDLORA; "
                              "only RandLora adapters can be read")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save={cfg['modules_to_save']!r} (whole trained modules are not an adapter; "
                        "load them with the model's own load_state_dict)")
    if cfg.get("target_parameters"):
        problems.append(f"target_parameters={cfg['target_parameters']!r} (only linear modules are supported)")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        problems.append(f"r={r!r} (must be a positive int)")
    if cfg.get("bias", "none") not in BIAS_MODES:
        problems.append(f"bias={cfg.get('bias')!r}")
    if problems:
        raise ConfigError(f"the peft adapter in {folder} uses settings this library does not support: "
                          + "; ".join(problems))


def read_peft(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], AdapterConfig, dict]:
    """Read a peft RandLora folder (never unpickles).

    Args:
        folder: a folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        ``(tensors, settings, raw_config)`` with tensors under this library's keys:
        ``<path>.randlora_lambda`` / ``.randlora_gamma`` / ``<path>.bias`` and, when the folder holds bases,
        ``randlora_A`` ``(r, m_g)`` and ``randlora_B`` ``(M_g, n_g, r)``. ``settings.targets`` lists the
        adapted module paths (read from the tensor keys, so ``layers_to_transform`` needs no
        re-evaluation); ``settings.recipe`` is ``"peft"``; ``settings.fan_in_fan_out`` is filled in when the
        adapter is applied. ``raw_config`` is the parsed ``adapter_config.json``.

    Raises:
        CheckpointError: a missing or unreadable file, a pickled-only folder, an adapter type other than
            RandLora, tensors that are not RandLora weights, or ``λ``/``γ``/bases of inconsistent shapes.
        ConfigError: settings this library does not support (``modules_to_save``, ``target_parameters``,
            a bad ``r`` or ``bias``).
    """
    folder = Path(folder)
    cpath, wpath = _peft_files(folder)
    cfg = _read_config(cpath)
    _check_config(cfg, folder)
    raw = _read_weights(wpath)
    tensors, per_layer_bases = _own_keys(raw, wpath)
    layers = _check_pairs(tensors, cfg["r"], wpath)
    _add_bases(tensors, raw.get(SHARED[0], per_layer_bases.get("randlora_A")),
               raw.get(SHARED[1], per_layer_bases.get("randlora_B")), cfg["r"], wpath)
    return tensors, _adapter_config(cfg, layers), cfg


def _peft_files(folder: Path) -> tuple[Path, Path]:
    """The folder's config and weights files, which must both exist."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; a peft adapter is a folder with {PEFT_CONFIG} and "
                              f"{PEFT_WEIGHTS} (for this library's own .safetensors file use randlora.load)")
    cpath, wpath = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    if not cpath.is_file():
        raise CheckpointError(f"{folder} has no {PEFT_CONFIG}; is it a peft adapter folder?")
    if not wpath.is_file():
        other = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = (f" It holds {other}: pickled weights are never loaded; save them again with "
                "safe_serialization=True" if other else "")
        raise CheckpointError(f"{folder} has no {PEFT_WEIGHTS}.{hint}")
    return cpath, wpath


def _read_config(cpath: Path) -> dict:
    try:
        cfg = json.loads(cpath.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cpath} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cpath} does not hold a JSON object")
    return cfg


def _read_weights(wpath: Path) -> dict[str, torch.Tensor]:
    from .filefmt import read_safetensors

    return read_safetensors(wpath)[0]


def _own_keys(raw: dict[str, torch.Tensor], wpath: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """peft's keys renamed to this library's, and the first per-layer copy of each basis (used when the
    folder has no shared one)."""
    tensors: dict[str, torch.Tensor] = {}
    per_layer_bases: dict[str, torch.Tensor] = {}
    unexpected = []
    for k, t in raw.items():
        if k in SHARED:
            continue
        if not k.startswith(PREFIX):
            unexpected.append(k)
            continue
        path, _, leaf = k[len(PREFIX):].rpartition(".")
        if leaf in ("randlora_lambda", "randlora_gamma"):
            tensors[f"{path}.{leaf}"] = t
        elif leaf in ("randlora_A", "randlora_B"):
            per_layer_bases.setdefault(leaf, t)
        elif leaf == "bias":
            owner = path[: -len(".base_layer")] if path.endswith(".base_layer") else path
            tensors[f"{owner}.bias"] = t
        else:
            unexpected.append(k)
    if unexpected:
        raise CheckpointError(f"{wpath} holds tensors that are not RandLora adapter weights: {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''} (modules_to_save or another adapter "
                              "type?); only randlora_lambda/gamma, biases and bases are supported")
    return tensors, per_layer_bases


def _check_pairs(tensors: dict[str, torch.Tensor], r: int, wpath: Path) -> list[str]:
    """The adapted layer paths, sorted; each must have ``λ (r, n)`` and ``γ (n, m)``."""
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".randlora_lambda", ".randlora_gamma"))})
    if not layers:
        raise CheckpointError(f"{wpath} holds no randlora_lambda/randlora_gamma tensors")
    for p in layers:
        lam, gam = tensors.get(f"{p}.randlora_lambda"), tensors.get(f"{p}.randlora_gamma")
        if lam is None or gam is None:
            raise CheckpointError(f"{wpath}: layer {p} has only one of randlora_lambda / randlora_gamma")
        if lam.dim() != 2 or gam.dim() != 2 or lam.shape[0] != r or lam.shape[1] != gam.shape[0]:
            raise CheckpointError(f"{wpath}: layer {p} has randlora_lambda {tuple(lam.shape)} and randlora_gamma "
                                  f"{tuple(gam.shape)}; expected (r={r}, n) and (n, m)")
    return layers


def _add_bases(tensors: dict[str, torch.Tensor], A: torch.Tensor | None, B: torch.Tensor | None, r: int,
               wpath: Path) -> None:
    """Store peft's ``A (r, 1, m_g)`` / ``B (M_g, n_g, r)`` as this library's ``randlora_A (r, m_g)`` /
    ``randlora_B``, float32 (nothing when the folder has no bases)."""
    if (A is None) != (B is None):
        raise CheckpointError(f"{wpath} holds only one of randlora_A / randlora_B")
    if A is None:
        return
    if A.dim() != 3 or A.shape[0] != r or A.shape[1] != 1 or B.dim() != 3 or B.shape[2] != r:
        raise CheckpointError(f"{wpath}: bases have shapes A{tuple(A.shape)}, B{tuple(B.shape)}; expected "
                              f"(r, 1, m_g) and (M_g, n_g, r) with r={r}")
    tensors["randlora_A"] = A.reshape(r, -1).to(torch.float32)
    tensors["randlora_B"] = B.to(torch.float32)


def _adapter_config(cfg: dict, layers: list[str]) -> AdapterConfig:
    """This library's settings for the folder's config; peft's defaults fill what it leaves out."""
    return AdapterConfig(
        targets=layers, r=cfg["r"], alpha=float(cfg.get("randlora_alpha", 640)), init="peft",
        dropout=float(cfg.get("randlora_dropout", 0.0) or 0.0), seed=int(cfg.get("projection_prng_key", 0) or 0),
        bases=_mode(cfg), recipe="peft", bias=cfg.get("bias", "none") or "none", fan_in_fan_out=[],
    )


def _check_layers(model: nn.Module, settings: AdapterConfig, cfg: dict, real: dict[str, str]) -> list[str]:
    """Conv1D layers need ``fan_in_fan_out`` (the adapter's paths are the model's linear layers already)."""
    conv = [p for p in settings.targets if is_conv1d(model.get_submodule(real[p]))]
    if conv and not cfg.get("fan_in_fan_out", False):
        raise ConfigError(f"layers {conv[:3]} are Conv1D (weights stored (in, out)) but the adapter config has "
                          "fan_in_fan_out=false; set \"fan_in_fan_out\": true in adapter_config.json if the "
                          "adapter was trained on these Conv1D layers")
    return conv


def load_peft(model: nn.Module, folder: str | os.PathLike, *, prefix: object = None) -> nn.Module:
    """Apply a peft RandLora adapter folder to a plain model (``inject`` with ``recipe="peft"``, then load).

    Bases come from the folder when it holds them, else they are regenerated with peft's recipe from
    ``projection_prng_key``. All or nothing: on any error the model is left as it was.

    Args:
        model: a model without a RandLora adapter, with the module paths the adapter was trained on
            (peft's keys are relative to the model passed to ``get_peft_model``).
        folder: a peft RandLora adapter folder.
        prefix: ``(FROM, TO)`` to map the folder's layer paths explicitly; by default they are matched to the
            model's by :func:`randlora.paths.match_paths` (exact, else one leading prefix added or stripped).

    Returns:
        ``model``, adapted, with the folder's ``λ``, ``γ``, trained biases and bases.

    Raises:
        StateError: the model already has a RandLora adapter.
        ConfigError: unsupported settings, or Conv1D layers with ``fan_in_fan_out=false``.
        CheckpointError: an unreadable folder, layers that are not the model's (see
            :func:`randlora.paths.match_paths`), bases of the wrong shapes, or biases the model lacks.
    """
    from .checkpoint import FP, load_state_dict

    tensors, settings, cfg = read_peft(folder)
    if locate(model) is not None:
        raise StateError("the model already has a RandLora adapter; call randlora.eject(model) or "
                         "randlora.merge(model) before loading another")
    model, tensors, real = _matched(model, settings, tensors, prefix)
    _check_layers(model, settings, cfg, real)
    targets = "|".join(re.escape(real[p]) for p in settings.targets)
    inject(model, targets, r=settings.r, alpha=settings.alpha, init="peft", dropout=settings.dropout,
           seed=settings.seed, bases=settings.bases, recipe="peft", bias=settings.bias)
    try:
        bank = require_bank(model)
        bank.registry.config().targets = list(settings.targets)  # the folder's order, for a faithful save_peft
        if "randlora_A" in tensors:
            _check_bases_fit(bank, tensors)
        else:
            tensors[FP] = bank.fingerprint.to_tensor()  # regenerated by peft's recipe: nothing to verify
        _load_biases_strictly(model, tensors, folder)
        load_state_dict(model, tensors)
    except BaseException:
        eject(model)
        raise
    return model


def _matched(model: nn.Module, settings: AdapterConfig, tensors: dict[str, torch.Tensor], prefix: object
             ) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, str]]:
    """The module to inject on, the tensors renamed for it and its ``{path: real module path}``, by the one
    matching rule: an adapter trained on a submodule goes on that submodule; one trained on a wrapper loads
    into the bare model."""
    model = compiled_inner(model)
    real = linear_paths(model, is_linear)
    pm = match_paths(settings.targets, real, prefix=prefix)
    if pm.add and not pm.strip:
        model = compiled_inner(next(m for n, m in model.named_modules() if canonical(n) == pm.add[:-1]))
        return model, tensors, linear_paths(model, is_linear)
    settings.targets = [pm(t) for t in settings.targets]
    return model, {k if k.startswith("randlora_") else pm(k): v for k, v in tensors.items()}, real


def _check_bases_fit(bank, tensors: dict[str, torch.Tensor]) -> None:
    want = (tuple(bank.A.shape), tuple(bank.B.shape))
    got = (tuple(tensors["randlora_A"].shape), tuple(tensors["randlora_B"].shape))
    if want != got:
        raise CheckpointError(f"the folder's bases have shapes A{got[0]}, B{got[1]} but the adapted layers "
                              f"need A{want[0]}, B{want[1]} (peft sizes them by the element-wise largest "
                              "(out, in) of its targets); was it saved for another model?")


def _load_biases_strictly(model: nn.Module, tensors: dict[str, torch.Tensor], folder) -> None:
    names = {n for n, _ in model.named_parameters()}
    stray = [k for k in tensors if k.endswith(".bias") and k not in names]
    if stray:
        raise CheckpointError(f"the adapter in {folder} holds biases the model does not have: {stray[:5]}")


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
@on_root
def save_peft(model: nn.Module, folder: str | os.PathLike, *, save_projection: bool = True,
              duplicate_bases: bool = False, name: str | None = None) -> Path:
    """Write the adapter as a peft RandLora folder that ``peft.PeftModel.from_pretrained`` loads.

    Each of the two files is written atomically.

    Args:
        model: a model adapted by :func:`randlora.inject`.
        folder: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into (created
            if needed; those files are replaced).
        save_projection: store the bases (float32, peft's shapes: this library's bank padded with zeros up
            to peft's element-wise-max sizing; no layer reads the padding). Without them peft regenerates
            bases from ``projection_prng_key`` with its own recipe, so that needs ``recipe="peft"``.
        duplicate_bases: also write peft's per-layer copies of the bases (peft does; they only silence its
            "missing adapter keys" warning and cost one bank per layer).
        name: the adapter (default: the active one).

    Returns:
        The folder.

    Raises:
        ConfigError: without ``save_projection``, bases peft would not regenerate (another recipe, or bases
            loaded from a file); Conv1D and ``nn.Linear`` layers mixed (peft has one ``fan_in_fan_out`` per
            adapter); or a bank that is not the one peft would build.
        StateError: the model has no RandLora adapter, or no adapter ``name``.
    """
    bank = require_bank(model)
    refuse_parameters(model, "randlora.save_peft", "peft's RandLora adapts modules only (no target_parameters)")
    cfg = config_of(model, name)
    layers = [(n, l, ad) for n, l in adapted_layers(model) if (ad := l.adapter(name)) is not None]
    refuse_kinds(layers, "randlora.save_peft", "peft's RandLora adapts nn.Linear and Conv1D layers only")
    shape, conv = _check_writable(bank, cfg, layers, save_projection)
    adapted = sorted(n for n, _, _ in layers)
    tensors = _peft_tensors(model, layers)
    if save_projection:
        tensors.update(_peft_bases(bank, shape, adapted if duplicate_bases else []))
    names = dict.fromkeys(canonical(n) for n, _ in model.named_modules() if n)
    config = _peft_config(cfg, conv, save_projection, target_modules(adapted, names))
    folder = Path(folder)
    write_folder(folder, tensors, config)
    return folder


def _check_writable(bank, cfg: AdapterConfig, layers: list, save_projection: bool) -> tuple[BankShape, bool]:
    """peft's bank shape for these layers, and whether they are Conv1D; refuses what peft would misread."""
    if not save_projection and cfg.recipe != "peft":
        raise ConfigError(f"this adapter's bases come from recipe={cfg.recipe!r}; without saved bases peft would "
                          "regenerate different ones (its own torch-generator recipe) and compute other weights. "
                          "Use save_peft(..., save_projection=True), or train with inject(..., recipe='peft')")
    conv = [n for n, l, _ in layers if l.fan_in_fan_out]
    if conv and len(conv) != len(layers):
        raise ConfigError(f"the adapter mixes Conv1D layers ({conv[:3]}) with nn.Linear layers; peft has a single "
                          "fan_in_fan_out setting per adapter, so it cannot be written as one peft folder")
    shape = bank_shape("peft", cfg.r, [(l.out_features, l.in_features) for _, l, _ in layers])
    if cfg.recipe == "peft" and shape != bank.shape:
        raise ConfigError(f"the bank {bank.shape} differs from the one peft would build ({shape}) for these layers")
    if not save_projection and bases_checksum(*generate("peft", cfg.seed, cfg.bases, shape)) != bank.checksum:
        raise ConfigError("this model's bases were loaded from a file and are not the ones peft regenerates from "
                          f"projection_prng_key={cfg.seed}; peft would compute other weights. Use "
                          "save_peft(..., save_projection=True)")
    return shape, bool(conv)


def _peft_tensors(model: nn.Module, layers: list) -> dict[str, torch.Tensor]:
    """``λ``, ``γ`` (float32) and trained biases under peft's keys, as CPU copies."""
    tensors: dict[str, torch.Tensor] = {}
    for n, _, ad in layers:
        tensors[f"{PREFIX}{n}.randlora_lambda"] = ad.randlora_lambda.detach().to("cpu", torch.float32).clone()
        tensors[f"{PREFIX}{n}.randlora_gamma"] = ad.randlora_gamma.detach().to("cpu", torch.float32).clone()
    adapted = {n for n, _, _ in layers}
    for pname, p in biases(model):
        if p.requires_grad:
            tensors[bias_key(canonical(pname), adapted)] = p.detach().to("cpu").clone()
    return tensors


def _peft_bases(bank, shape: BankShape, copies_for: list[str]) -> dict[str, torch.Tensor]:
    """The shared bases at peft's sizes, plus a per-layer copy for each path in ``copies_for``."""
    A, B = _padded_bases(bank.A, bank.B, shape)
    tensors = {SHARED[0]: A, SHARED[1]: B}
    for n in copies_for:
        tensors[f"{PREFIX}{n}.randlora_A"] = A.clone()
        tensors[f"{PREFIX}{n}.randlora_B"] = B.clone()
    return tensors


def _peft_config(cfg: AdapterConfig, conv: bool, save_projection: bool, targets: list[str] | str) -> dict:
    """The ``adapter_config.json`` contents, every key peft writes."""
    alpha = cfg.alpha
    return {
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": cfg.bias,
        "fan_in_fan_out": conv,
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "peft_type": "RANDLORA",
        "peft_version": PEFT_VERSION,
        "projection_prng_key": cfg.seed,
        "r": cfg.r,
        "randlora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "randlora_dropout": cfg.dropout,
        "revision": None,
        "save_projection": bool(save_projection),
        "sparse": cfg.bases == "sparse",
        "target_modules": targets,
        "task_type": None,
        "very_sparse": cfg.bases == "very_sparse",
    }


def _padded_bases(A: torch.Tensor, B: torch.Tensor, shape: BankShape) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` as ``(r, 1, m_g)`` and ``B`` as ``(M_g, n_g, r)`` at peft's sizes, float32, zero padded."""
    r, m, M, n = A.shape[0], A.shape[1], B.shape[0], B.shape[1]
    if m > shape.m or M > shape.M or n > shape.n:
        raise ConfigError(f"the bank A({r}, {m}), B({M}, {n}, {r}) is larger than peft's sizing {shape}")
    Ap = torch.zeros(shape.r, 1, shape.m, dtype=torch.float32)
    Bp = torch.zeros(shape.M, shape.n, shape.r, dtype=torch.float32)
    Ap[:, 0, :m] = A.detach().to("cpu", torch.float32)
    Bp[:M, :n] = B.detach().to("cpu", torch.float32)
    return Ap, Bp
