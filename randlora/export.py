"""Export to a plain LoRA adapter: a truncated SVD of each adapted layer's update ``s·ΔW``.

Serving stacks with multi-adapter batching load LoRA adapters only. :func:`to_lora` factors every
adapted layer's ``s·ΔW`` (``O × I``) as ``lora_B @ lora_A`` with ``lora_A`` ``(k, I)`` and ``lora_B``
``(O, k)`` (the singular values split evenly between them), for a fixed rank ``k`` or the smallest ``k``
keeping a fraction of the update's energy (squared Frobenius norm); by default that fraction is
:data:`DEFAULT_ENERGY` (a relative error of at most ``√(1 − DEFAULT_ENERGY)`` per layer). :func:`save_lora`
writes a standard peft LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``) with ``lora_alpha = r`` so the scale is
one; layers of another rank go into ``rank_pattern`` / ``alpha_pattern`` (also scale one). peft is never
imported. :func:`export_file` does the same from an adapter file and the base weight file, without
model code (the ``export-lora`` command).

A RandLora update is full rank, so a rank-``k`` LoRA drops the part of ``ΔW`` beyond its top ``k``
singular directions: each layer reports its relative reconstruction error
``‖s·ΔW − B A‖_F / ‖s·ΔW‖_F`` (measured on the written factors, after the cast to their dtype).

The factors do not depend on the number of threads: each layer's ``s·ΔW`` is built and factored on one
CPU thread (LAPACK's and BLAS's results change with the thread count: measured, up to 0.13 element-wise
on the benchmark model's float32 factors, the products agreeing), and each singular pair's sign is fixed
(the largest-magnitude entry of each column of ``lora_B`` is positive) instead of left to LAPACK.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, StateError
from .files import read_for_weights
from .paths import canonical, examples, on_root
from .peft_format import (CONFIG_FILE, KEY_PREFIX, LORA_BIAS, PEFT_VERSION, WEIGHTS_FILE, bias_key, target_modules,
                          write_folder)

__all__ = ["LoraLayer", "LoraExport", "to_lora", "save_lora", "export_file", "METHODS", "DEFAULT_ENERGY"]

PREFIX, LORA_CONFIG, LORA_WEIGHTS = KEY_PREFIX, CONFIG_FILE, WEIGHTS_FILE
METHODS = ("auto", "svd", "lowrank")
# svd_lowrank settings: oversampling columns and power iterations. With 4 iterations the randomized
# factors' error stayed within 0.6 % of the optimal truncation's on trained-like RandLora updates, whose
# spectra decay slowly (benchmarks/export.py measures it per rank).
_OVERSAMPLE = 16
_NITER = 4
# ``method="auto"`` uses the randomized SVD while ``k + oversampling`` is at most this fraction of
# ``min(O, I)``: at 0.27 it was still 1.8x faster than the full SVD, at 0.5 0.8-0.9x (benchmarks/export.py).
_LOWRANK_MAX_FRACTION = 0.3
# The export's default (neither rank nor energy given): each layer keeps this fraction of ‖s·ΔW‖_F², so its
# relative error is at most √(1 − 0.99) = 0.1. On a trained adapter (all-MiniLM-L6-v2, query/value, r = 32,
# 300 steps; benchmarks/export_trained.py, docs/export.md) it kept ranks 153-163 of 384 (41 % of full
# rank's size), changed the logits by 4.1 % and the test accuracy by -0.3 points (97.2 % of predictions
# unchanged); 0.9 kept ranks 61-71 and 90.4 % of predictions, 0.999 ranks 227-238 and 99.0 %.
DEFAULT_ENERGY = 0.99


@dataclass
class LoraLayer:
    """One layer's LoRA factors: ``lora_B @ lora_A`` approximates the layer's ``s·ΔW`` (``O × I``).

    ``error`` is ``‖s·ΔW − lora_B lora_A‖_F / ‖s·ΔW‖_F`` (0 for a zero update) and ``energy`` the fraction
    of ``‖s·ΔW‖_F²`` the kept singular values hold. ``fan_in_fan_out`` marks a GPT-2 style ``Conv1D``
    layer (its weight is stored ``(I, O)``; the factors are still ``(k, I)`` and ``(O, k)``, as peft's).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    error: float
    energy: float
    fan_in_fan_out: bool = False
    kernel: tuple[int, ...] | None = None
    """A convolution's kernel shape ``(O, I, k₁, …)``: the factors are written as peft's conv LoRA holds them,
    ``lora_A`` ``(k, I, k₁, …)`` and ``lora_B`` ``(O, k, 1, …)`` (the matrices reshaped)."""
    param: str | None = None
    """An adapted parameter's path (``target_parameters``): written as peft's ``target_parameters`` LoRA, its
    experts' factors stacked (``lora_A`` ``(E·k, in)``, ``lora_B`` ``(out, k·E)``; :mod:`randlora.expert_lora`)."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(O, I)`` of the layer."""
        return (self.lora_B.shape[0], self.lora_A.shape[1])


@dataclass
class LoraExport:
    """The result of :func:`to_lora` / :func:`export_file`: LoRA factors per adapted layer.

    ``biases`` holds trained biases (``<path>.bias`` -> tensor) and ``bias`` peft's matching LoRA ``bias``
    setting (``"none"``, ``"all"`` or ``"lora_only"``). ``module_names`` are the model's module paths,
    used to write ``target_modules`` so that peft selects exactly the exported layers.
    """

    layers: dict[str, LoraLayer]
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    bias: str = "none"
    module_names: list[str] = field(default_factory=list)
    seconds: float = 0.0
    source: dict = field(default_factory=dict)  # export_file: "file" (the adapter file read), "paths" (mapping)

    @property
    def ranks(self) -> dict[str, int]:
        return {p: l.rank for p, l in self.layers.items()}

    @property
    def max_error(self) -> float:
        """The largest per-layer relative reconstruction error."""
        return max((l.error for l in self.layers.values()), default=0.0)

    @property
    def parameters(self) -> int:
        """Number of LoRA parameters (``k·(O + I)`` summed over layers)."""
        return sum(l.lora_A.numel() + l.lora_B.numel() for l in self.layers.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of ``adapter_model.safetensors`` under peft's keys (CPU, contiguous)."""
        sd: dict[str, torch.Tensor] = {}
        for p, l in self.layers.items():
            A, B = l.lora_A, l.lora_B
            if l.kernel is not None:  # a convolution: lora_A a conv of its kernel size, lora_B a 1 × 1 conv
                A, B = A.reshape(l.rank, *l.kernel[1:]), B.reshape(l.kernel[0], l.rank, *(1,) * (len(l.kernel) - 2))
            sd[f"{PREFIX}{p}.lora_A.weight"] = A.detach().to("cpu").contiguous()
            sd[f"{PREFIX}{p}.lora_B.weight"] = B.detach().to("cpu").contiguous()
        for k, t in self.biases.items():
            sd[bias_key(k, self.layers)] = t.detach().to("cpu").contiguous()
        return sd

    def adapter_config(self) -> dict:
        """The ``adapter_config.json`` contents: ``r`` is the largest rank, ``lora_alpha = r`` (scale one);
        layers of another rank get ``rank_pattern`` / ``alpha_pattern`` entries with ``alpha = rank``."""
        if not self.layers:
            raise StateError("the export holds no layer")
        r = max(self.ranks.values())
        paths = sorted(self.layers)
        names = set(self.module_names) | set(paths)
        modules = [p for p in paths if self.layers[p].param is None]
        params = sorted(self.layers[p].param for p in paths if self.layers[p].param is not None)
        targets = target_modules(modules, names) if modules else []
        rank_pattern = {}
        for p in paths:
            k = self.layers[p].rank
            if k != r:
                rank_pattern[self.layers[p].param or _pattern_key(names, p)] = k
        ffo = {l.fan_in_fan_out for l in self.layers.values()}
        if len(ffo) > 1:
            conv = [p for p in paths if self.layers[p].fan_in_fan_out]
            raise ConfigError(f"the adapter mixes Conv1D layers ({conv[:3]}) with nn.Linear layers; peft has a single "
                              "fan_in_fan_out setting per adapter, so it cannot be written as one LoRA folder")
        return {
            "alpha_pattern": dict(rank_pattern),
            "auto_mapping": None,
            "base_model_name_or_path": None,
            "bias": self.bias,
            "exclude_modules": None,
            "fan_in_fan_out": ffo.pop(),
            "inference_mode": True,
            "init_lora_weights": True,
            "layer_replication": None,
            "layers_pattern": None,
            "layers_to_transform": None,
            "lora_alpha": r,
            "lora_bias": False,
            "lora_dropout": 0.0,
            "modules_to_save": None,
            "peft_type": "LORA",
            "peft_version": PEFT_VERSION,
            "r": r,
            "rank_pattern": rank_pattern,
            "revision": None,
            "target_modules": targets,
            "target_parameters": params or None,
            "task_type": None,
            "use_dora": False,
            "use_rslora": False,
        }

    def __repr__(self) -> str:
        w = max([len("layer")] + [len(l.param or p) for p, l in self.layers.items()])
        lines = [f"{'layer':<{w}}  {'O':>6}  {'I':>6}  {'rank':>5}  {'energy':>8}  {'rel. error':>10}"]
        for p, l in self.layers.items():
            O, I = l.shape  # (an adapted parameter: by its path; O, I one expert's, as peft reads it)
            p = l.param or p
            lines.append(f"{p:<{w}}  {O:>6}  {I:>6}  {l.rank:>5}  {l.energy:>8.4f}  {l.error:>10.3e}")
        lines.append(f"{len(self.layers)} layers, {self.parameters:,} LoRA parameters, largest relative error "
                     f"{self.max_error:.3e}" + (f", {len(self.biases)} trained biases" if self.biases else ""))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# naming (peft's target_modules / rank_pattern matching)
# ------------------------------------------------------------------------------------------------
def _pattern_key(names: set[str], path: str) -> str:
    """A ``rank_pattern`` key selecting ``path`` only. peft matches keys as ``(.*\\.)?(key)$``: the plain
    path (what peft itself writes) unless another module's name ends with it; then an anchored regex."""
    if any(n != path and n.endswith("." + path) for n in names) or re.escape(path) != path.replace(".", r"\."):
        return "^" + re.escape(path)
    return path


# ------------------------------------------------------------------------------------------------
# the factorisation
# ------------------------------------------------------------------------------------------------
def _check_choice(rank, energy, method) -> tuple[int | str | None, float | None]:
    """Validate the export settings; returns ``(rank, energy)`` with the default (``energy=DEFAULT_ENERGY``)
    applied when neither is given."""
    if rank is not None and energy is not None:
        raise ConfigError(f"pass at most one of rank (an int > 0 or 'full') and energy (a fraction in (0, 1]), not "
                          f"both; got rank={rank!r}, energy={energy!r}. Pass neither for the default, "
                          f"energy={DEFAULT_ENERGY}")
    if rank is None and energy is None:
        energy = DEFAULT_ENERGY
    if rank is not None and rank != "full" and (
            isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0):
        raise ConfigError(f"rank must be a positive int or 'full' (each layer's min(O, I): exact), got {rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, numbers.Real)
                               or not 0 < energy <= 1 or math.isnan(energy)):
        raise ConfigError(f"energy must be a number in (0, 1] (the fraction of each layer's squared Frobenius "
                          f"norm to keep, e.g. 0.9), got {energy!r}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if energy is not None and method == "lowrank":
        raise ConfigError("method='lowrank' needs a fixed rank: choosing a rank by energy (the default when no "
                          "rank is given) needs every singular value. Pass rank=k, or use method='svd' or 'auto'")
    return rank, energy


def _choose_rank(S: torch.Tensor, energy: float) -> int:
    """The smallest ``k`` whose top ``k`` singular values hold at least ``energy`` of ``Σ σ²`` (1 if all zero)."""
    e = S.double() ** 2
    cs = torch.cumsum(e, 0)
    total = float(cs[-1])
    if total == 0.0:
        return 1
    k = int(torch.searchsorted(cs, torch.tensor([energy * total], dtype=torch.float64)).item()) + 1
    return min(k, S.numel())


@contextlib.contextmanager
def _one_thread():
    """Run the enclosed torch CPU work on one thread (the caller's thread count is restored after): LAPACK's
    SVD and BLAS's products round differently with another number of threads, and a singular vector of a
    close pair of singular values can turn, so factors would depend on the machine's thread count."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular pairs with a defined sign: each column of ``U`` gets its largest-magnitude entry (the first
    one on a tie) positive, and the matching row of ``Vh`` the same flip (``U Σ Vh`` is unchanged)."""
    if U.shape[1] == 0:
        return U, Vh
    peak = U.gather(0, U.abs().argmax(0, keepdim=True))[0]
    sign = torch.where(peak < 0, -1.0, 1.0).to(U.dtype)
    return U * sign, Vh * sign[:, None]


def factor(D: torch.Tensor, *, rank: int | str | None = None, energy: float | None = None, method: str = "auto",
           dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
    """Truncated SVD of one ``(O, I)`` update: ``(lora_A (k, I), lora_B (O, k), k, error, energy kept)``.

    Deterministic whatever the thread count: the work runs on one CPU thread, and each singular pair's
    sign is fixed (the largest-magnitude entry of each column of ``lora_B`` is positive).

    Args:
        D: the update ``s·ΔW`` (float32 or float64; the SVD runs in its dtype).
        rank: a fixed rank (capped at ``min(O, I)``) or ``"full"``; or
        energy: the fraction of ``‖D‖_F²`` to keep (the smallest rank that does). Neither given:
            ``energy=DEFAULT_ENERGY``.
        method: ``"svd"`` (``torch.linalg.svd``), ``"lowrank"`` (``torch.svd_lowrank``, randomized;
            fixed rank only) or ``"auto"`` (randomized when the rank is small against ``min(O, I)``).
        dtype: the factors' dtype (default ``D``'s); ``error`` is measured after this cast.

    Returns:
        ``(lora_A, lora_B, k, error, energy_kept)`` with ``error = ‖D − B A‖_F / ‖D‖_F``.

    Raises:
        ConfigError: bad ``rank``/``energy``/``method``, both ``rank`` and ``energy``, or
            ``method="lowrank"`` with ``energy`` (the default included).
    """
    rank, energy = _check_choice(rank, energy, method)
    if not D.is_floating_point() or D.dim() != 2:
        raise ConfigError(f"expected a 2-D floating-point update, got {D.dtype} of shape {tuple(D.shape)}")
    with _one_thread():
        return _factor(D.detach(), rank, energy, method, dtype)


def _factor(D: torch.Tensor, rank, energy, method, dtype) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
    O, I = D.shape
    m = min(O, I)
    k = None if energy is not None else (m if rank == "full" else min(int(rank), m))
    lowrank = k is not None and k < m and (
        method == "lowrank" or (method == "auto" and k + _OVERSAMPLE <= _LOWRANK_MAX_FRACTION * m))
    if lowrank:
        q = min(k + _OVERSAMPLE, m)
        # a fixed test matrix (same factors on every call) without disturbing the caller's random stream
        with torch.random.fork_rng(devices=[D.device] if D.device.type == "cuda" else []):
            torch.manual_seed(0)
            U, S, V = torch.svd_lowrank(D, q=q, niter=_NITER)
        Vh = V.mT
    else:
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    if k is None:
        k = _choose_rank(S, float(energy))  # type: ignore[arg-type]
    Uk, Vk = _fix_signs(U[:, :k], Vh[:k])
    root = S[:k].clamp_min(0).sqrt()
    out = D.dtype if dtype is None else dtype
    B = (Uk * root).to(out).contiguous()
    A = (root[:, None] * Vk).to(out).contiguous()
    acc = D.dtype
    norm = float(torch.linalg.matrix_norm(D))
    if norm == 0.0:
        err = 0.0 if float(torch.linalg.matrix_norm(B.to(acc) @ A.to(acc))) == 0.0 else math.inf
        kept = 1.0
    else:
        err = float(torch.linalg.matrix_norm(D - B.to(acc) @ A.to(acc))) / norm
        kept = min(1.0, float((S[:k].double() ** 2).sum()) / norm**2)
    return A, B, k, err, kept


def _export(items: Iterable[tuple[str, Callable[[], torch.Tensor], bool, torch.dtype]], *, rank, energy, method,
            dtype, kernels: dict[str, tuple[int, ...]] | None = None) -> dict[str, LoraLayer]:
    layers: dict[str, LoraLayer] = {}
    for path, delta, ffo, wdtype in items:
        with _one_thread():  # s·ΔW too: its products may round differently with another thread count
            D = delta()
            if not bool(torch.isfinite(D).all()):
                raise StateError(f"layer {path}: its update s·ΔW holds inf/nan (λ/γ are non-finite or overflow); "
                                 "nothing was exported. Reload a good adapter")
            A, B, k, err, kept = factor(D, rank=rank, energy=energy, method=method,
                                        dtype=wdtype if dtype is None else dtype)
        del D
        layers[path] = LoraLayer(lora_A=A, lora_B=B, rank=k, error=err, energy=kept, fan_in_fan_out=ffo,
                                 kernel=(kernels or {}).get(path))
    return layers


def _lora_kernels(chosen: list) -> dict[str, tuple[int, ...]]:
    """The kernel shape of each adapted convolution among ``chosen`` (``(path, layer)`` pairs), checked to fit
    peft's conv LoRA (:func:`randlora.conv.lora_misfit`).

    Raises:
        StateError: a convolution peft's LoRA cannot hold, or an attention module's in_proj.
    """
    from .conv import RandLoraConv, lora_misfit
    from .selection import refuse_kinds

    convs = {p: l for p, l in chosen if isinstance(l, RandLoraConv)}
    bad = [f"{p} ({why})" for p, l in convs.items() if (why := lora_misfit(l.base_layer))]
    if bad:
        raise StateError(f"randlora.to_lora cannot write the adapted convolutions {', '.join(bad[:2])} as peft LoRA "
                         "factors: peft's conv LoRA computes lora_B(lora_A(x)) with lora_A a dense convolution of "
                         "the base's kernel size, stride and padding, without groups, dilation or another padding "
                         "mode, so it would compute something else. Keep this adapter in randlora's own format "
                         "(randlora.save), merge it (randlora.merge), or leave those layers out of the adapter")
    refuse_kinds([(p, l) for p, l in chosen if p not in convs], "randlora.to_lora", "this export writes LoRA factors "
                 "of linear layers and convolutions (peft's LoRA wraps nn.MultiheadAttention in a layout of its own)")
    return {p: tuple(l.weight.shape) for p, l in convs.items()}


def _check_dtype(dtype) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16) or None (the weights' "
                          f"dtype), got {dtype!r}")


@on_root
def to_lora(model: nn.Module, rank: int | str | None = None, energy: float | None = None, *, name: str | None = None,
            method: str = "auto", dtype: torch.dtype | None = None,
            svd_dtype: torch.dtype = torch.float32) -> LoraExport:
    """LoRA factors of every adapted layer's ``s·ΔW`` by a truncated SVD (the model is not changed); an adapted
    parameter (``target_parameters``) is factored expert by expert into peft's ``target_parameters`` layout
    (:mod:`randlora.expert_lora`), its rank the largest of its experts'.

    The factors do not depend on ``torch.get_num_threads()``: each layer is built and factored on one CPU
    thread (the caller's count is restored after), and each singular pair's sign is fixed.

    Args:
        model: a model adapted by :func:`randlora.inject` (or loaded with :func:`randlora.load`).
        rank: the LoRA rank of every layer (capped at the layer's ``min(O, I)``, which is exact), or
            ``"full"`` for ``min(O, I)`` everywhere (exact up to rounding).
        energy: instead of ``rank``, the fraction in ``(0, 1]`` of each layer's ``‖s·ΔW‖_F²`` to keep: each
            layer gets the smallest rank that keeps it, and a relative error of at most ``√(1 − energy)``.
            Neither ``rank`` nor ``energy`` given: ``energy=DEFAULT_ENERGY``.
        name: the adapter to export (default: the active one).
        method: ``"auto"`` (randomized ``torch.svd_lowrank`` when the rank is small against ``min(O, I)``,
            else ``torch.linalg.svd``), ``"svd"`` or ``"lowrank"``.
        dtype: the factors' dtype (default: each layer's weight dtype).
        svd_dtype: the dtype ``s·ΔW`` is built and factored in (``torch.float32`` or ``torch.float64``).

    Returns:
        A :class:`LoraExport` (factors, ranks, per-layer relative errors; ``print`` it for a table).

    Raises:
        StateError: the model has no RandLora adapter, no layer carries adapter ``name``, or an update is
            non-finite.
        ConfigError: bad ``rank``, ``energy``, ``method``, ``dtype`` or ``svd_dtype``; both ``rank`` and
            ``energy``.
    """
    import time

    from .expert_lora import export_parameters
    from .experts import adapted_parameters
    from .walker import adapted_layers, is_bias_name, require_bank

    rank, energy = _check_choice(rank, energy, method)
    _check_dtype(dtype)
    if svd_dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"svd_dtype must be torch.float32 or torch.float64, got {svd_dtype!r}")
    bank = require_bank(model)
    adapter = bank.registry.resolve(name)
    chosen = [(p, l) for p, l in adapted_layers(model) if l.adapter(adapter) is not None]
    kernels = _lora_kernels(chosen)
    params = [(p, u) for p, u in adapted_parameters(model) if u.adapter(adapter) is not None]
    if not chosen and not params:
        raise StateError(f"no adapted layer carries adapter {adapter!r}")
    t0 = time.perf_counter()
    with torch.no_grad():
        items = [(p, (lambda l=l: l.delta_weight(svd_dtype, adapter)), l.fan_in_fan_out,
                  torch.float32 if l.quantized else l.weight.dtype) for p, l in chosen]
        layers = _export(items, rank=rank, energy=energy, method=method, dtype=dtype, kernels=kernels)
        layers.update(export_parameters(params, adapter, rank=rank, energy=energy, method=method, dtype=dtype,
                                        svd_dtype=svd_dtype))
    biases = {canonical(n): p.detach().clone() for n, p in model.named_parameters()
              if p.requires_grad and is_bias_name(n)}
    cfg = bank.registry.adapters[adapter]
    bias = LORA_BIAS.get(cfg.bias, "all") if biases else "none"
    out = LoraExport(layers=layers, biases=biases, bias=bias,
                     module_names=list(dict.fromkeys(canonical(n) for n, _ in model.named_modules() if n)))
    out.seconds = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def _check_folder(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} exists and is not a folder; pass a new folder path for the LoRA adapter")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise CheckpointError(f"{folder} exists and is not empty; nothing was written. Pass a new folder, empty "
                              "it, or pass overwrite=True (--force on the command line) to replace its adapter files")


def save_lora(model_or_export: nn.Module | LoraExport, folder: str | os.PathLike, rank: int | str | None = None,
              energy: float | None = None, *, name: str | None = None, method: str = "auto",
              dtype: torch.dtype | None = None, overwrite: bool = False) -> LoraExport:
    """Write a peft LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``), atomically per file.

    Args:
        model_or_export: an adapted model (exported with :func:`to_lora` and ``rank``/``energy``/``name``/
            ``method``/``dtype``), or a :class:`LoraExport` already made.
        folder: the output folder; it must not exist or be empty unless ``overwrite``.
        rank, energy, name, method, dtype: as for :func:`to_lora` (only with a model; neither ``rank`` nor
            ``energy``: ``energy=DEFAULT_ENERGY``).
        overwrite: replace the adapter files of a non-empty folder.

    Returns:
        The :class:`LoraExport` written (ranks and per-layer relative errors).

    Raises:
        CheckpointError: ``folder`` is a file, or a non-empty folder without ``overwrite``.
        ConfigError: bad export settings, settings passed with a :class:`LoraExport`, or Conv1D and
            ``nn.Linear`` layers mixed (peft has one ``fan_in_fan_out`` per adapter).
        StateError: as for :func:`to_lora`.
    """
    folder = Path(folder)
    _check_folder(folder, overwrite)
    if isinstance(model_or_export, LoraExport):
        if rank is not None or energy is not None or name is not None or dtype is not None or method != "auto":
            raise ConfigError("rank/energy/name/method/dtype apply when exporting a model; a LoraExport is already "
                              "factored: pass the model instead, or call to_lora again")
        exp = model_or_export
    elif isinstance(model_or_export, nn.Module):
        exp = to_lora(model_or_export, rank, energy, name=name, method=method, dtype=dtype)
    else:
        raise ConfigError(f"expected an adapted torch.nn.Module or a LoraExport, got {type(model_or_export).__name__}")
    config = exp.adapter_config()  # validates before anything is written
    write_folder(folder, exp.state_dict(), config)
    return exp


# ------------------------------------------------------------------------------------------------
# from files (no model code)
# ------------------------------------------------------------------------------------------------
def _warn_trained_beside(adapter: str | os.PathLike) -> None:
    """Say at WARNING that a Trainer checkpoint folder's parameters trained beside the adapter (a task head) are
    not in the LoRA export, and how to restore them (a LoRA folder holds the layers' factors only)."""
    from .hf import read_trainable

    trained = read_trainable(adapter) if Path(adapter).is_dir() else None
    if trained is not None and trained.tensors:
        logging.getLogger("randlora").warning(
            "randlora: the LoRA export holds the adapter only; %d tensors trained beside it (%s) in %s are not in "
            "it, so a model with the LoRA applied differs from the trained one there. Load them into that model "
            "too: model.load_state_dict(safetensors.torch.load_file(%r), strict=False) (their names are relative "
            "to the Trainer's model)", len(trained.tensors), examples(sorted(trained.tensors)), trained.file,
            str(trained.file))


def export_file(adapter: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike | None = None,
                rank: int | str | None = None, energy: float | None = None, *, prefix: object = None,
                method: str = "auto", dtype: torch.dtype | None = None, overwrite: bool = False) -> LoraExport:
    """Export an adapter file (or peft RandLora folder) to LoRA without model code.

    The layers' shapes come from the header of the base model's safetensors weight file (each layer's
    ``.weight``, its path mapped by :func:`randlora.paths.match_paths`; no tensor is read: the update does
    not depend on ``W``); the bases come from the adapter when it holds them, else they are regenerated
    from its seed and recipe and verified against its fingerprint. ``s·ΔW`` is built in float32 from bases
    in the weight file's dtype, as :func:`randlora.inject` builds them, and factored on one thread, so the
    result equals :func:`to_lora` on the adapted model bit for bit, whatever either's thread count.

    Args:
        adapter: this library's ``.safetensors`` adapter, a Trainer checkpoint folder holding one, or a peft
            RandLora adapter folder.
        base: the base model's ``.safetensors`` weight file.
        out: the LoRA folder to write (None: only return the export).
        rank, energy, method, dtype: as for :func:`to_lora` (neither ``rank`` nor ``energy``:
            ``energy=DEFAULT_ENERGY``; ``dtype`` default: the weight file's dtype).
        prefix: None (the adapter's paths mapped onto ``base``'s automatically: exact, else the unique prefix
            added or stripped) or an override, ``"FROM=TO"``, ``"TO"`` (added) or ``(FROM, TO)`` (see
            :func:`randlora.files.read_for_weights`). The written keys keep the adapter's paths.
        overwrite: as for :func:`save_lora`.

    Returns:
        The :class:`LoraExport`.

    Raises:
        CheckpointError: unreadable files, layer paths that do not map onto ``base``'s weights (or map in
            several ways), weights of the wrong shape, an existing non-empty ``out``; FingerprintMismatch
            when the regenerated bases are not the adapter's.
        ConfigError: bad ``rank``/``energy``/``method``/``dtype``; both ``rank`` and ``energy``.
    """
    import time

    from .walker import is_bias_name

    rank, energy = _check_choice(rank, energy, method)
    _check_dtype(dtype)
    if out is not None:
        _check_folder(Path(out), overwrite)
    fa = read_for_weights(adapter, base, prefix)
    if any(fa.stacked(p) for p in fa.layers):
        raise CheckpointError(f"{fa.info['file']} adapts 3-D parameters (target_parameters: "
                              f"{[p for p in fa.layers if fa.stacked(p)][:2]}), which this export does not write as "
                              "LoRA factors; nothing was written. Merge it into the weights instead: python -m "
                              "randlora merge")
    kernels = [p for p in fa.layers if not fa.stacked(p) and len(fa.entries[fa.keys[p]]["shape"]) > 2]
    if kernels:
        raise CheckpointError(f"{fa.info['file']} adapts convolutions ({examples(kernels, 2)}): peft's LoRA holds "
                              "their factors as convolutions, which need the layer's groups, dilation and padding mode, "
                              "and a weight file does not say them; nothing was written. Export from the model "
                              "instead: randlora.load(model, adapter), then randlora.save_lora(model, folder)")
    _warn_trained_beside(adapter)
    A, B = fa.bases()
    t0 = time.perf_counter()
    with torch.no_grad():
        items = [(p, (lambda p=p: fa.delta(p, A, B, torch.float32)), p in fa.ffo, fa.dtypes[p]) for p in fa.layers]
        factored = _export(items, rank=rank, energy=energy, method=method, dtype=dtype)
    biases = {k: t for k, t in fa.tensors.items() if is_bias_name(k)}
    names: set[str] = set()  # the file's module paths, in the adapter's namespace (the written keys')
    pm = fa.pathmap
    for k in fa.entries:
        if k.startswith(pm.add):
            parts = (pm.strip + k[len(pm.add):]).split(".")[:-1]
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    exp = LoraExport(layers=factored, biases=biases, bias=LORA_BIAS.get(fa.cfg.bias, "all") if biases else "none",
                     module_names=sorted(names), source={"file": str(fa.info["file"]), "paths": pm})
    exp.seconds = time.perf_counter() - t0
    if out is not None:
        save_lora(exp, out, overwrite=overwrite)
    return exp
