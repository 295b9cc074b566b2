"""Adapter files read without model code: what ``merge``, ``inspect`` and ``export-lora`` share.

An adapter is this library's ``.safetensors`` file or a peft RandLora folder (:func:`read_adapter`); the
base model is a safetensors weight file, of which only the header is parsed (:func:`read_header`) to learn
each adapted layer's shape and dtype (:func:`weight_shapes`). The bases come from the adapter when it
holds them, else they are regenerated from its settings and verified (:func:`adapter_bases`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .bank import Fingerprint, bases_checksum, layer_views
from .checkpoint import FP, read_file
from .errors import CheckpointError, FingerprintMismatch
from .ops import delta_weight
from .peft_io import PEFT_CONFIG, PEFT_WEIGHTS, is_peft_folder, read_peft
from .recipes import bank_shape, generate, n_bases
from .walker import AdapterConfig

__all__ = ["DTYPES", "FileAdapter", "read_for_weights", "read_adapter", "read_header", "tensor_entries",
           "layer_paths", "fan_in_fan_out_layers", "weight_shapes", "bank_dtype", "adapter_bases"]

# safetensors dtype names of the weights an adapter can be folded into
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_HEADER = 100 << 20  # a larger header is a corrupt length field, not a real file


@dataclass
class FileAdapter:
    """An adapter read against a base model's weight file (its header only): what ``merge`` and
    ``export-lora`` work from."""

    tensors: dict[str, torch.Tensor]
    cfg: AdapterConfig
    info: dict  # as :func:`read_adapter` returns it
    header_size: int  # bytes of the weight file's JSON header (its data starts 8 bytes later)
    entries: dict[str, dict]  # the weight file's tensor entries
    layers: list[str]  # the adapted module paths, sorted
    ffo: set[str]  # the layers whose weight is stored ``(in, out)``
    shapes: dict[str, tuple[int, int]]  # each layer's ``(O, I)``
    dtypes: dict[str, torch.dtype]  # each layer's weight dtype

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's bases (see :func:`adapter_bases`) in the dtype :func:`randlora.inject` would give the
        bank of these weights, so that results equal those of the adapted model."""
        A, B = adapter_bases(self.tensors, self.cfg, self.info, list(self.shapes.values()))
        dtype = bank_dtype(self.dtypes.values())
        return A.to(dtype), B.to(dtype)

    def delta(self, path: str, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Layer ``path``'s ``s·ΔW`` ``(O, I)`` in ``dtype``, from the bank ``A``, ``B`` of :meth:`bases`."""
        O, I = self.shapes[path]
        Av, Bv = layer_views(A, B, O, I, self.cfg.r)
        return delta_weight(self.tensors[f"{path}.randlora_lambda"], self.tensors[f"{path}.randlora_gamma"], Av,
                            Bv, self.cfg.alpha / self.cfg.r, O < I, dtype)


def read_for_weights(adapter: str | os.PathLike, base: Path, prefix: str = "") -> FileAdapter:
    """Read ``adapter`` and the header of the weight file ``base``, and match each adapted layer to its weight.

    Args:
        adapter: this library's ``.safetensors`` adapter or a peft RandLora adapter folder.
        base: the base model's ``.safetensors`` weight file (only its header is read).
        prefix: prepended to the adapter's module paths to find ``<prefix><path>.weight`` in ``base``.

    Returns:
        A :class:`FileAdapter`.

    Raises:
        CheckpointError: an unreadable adapter or weight file, an adapter without layers, or layers whose
            weights are missing from ``base`` or do not fit the adapter (see :func:`weight_shapes`).
        ConfigError: a peft folder with settings this library does not support.
    """
    tensors, cfg, info = read_adapter(adapter)
    header_size, header = read_header(base)
    entries = tensor_entries(header)
    layers = layer_paths(tensors)
    if not layers:
        raise CheckpointError(f"{adapter} holds no adapted layer (no randlora_lambda tensors)")
    ffo = fan_in_fan_out_layers(cfg, info, layers)
    shapes, dtypes = weight_shapes(base, entries, tensors, cfg, layers, ffo, prefix)
    return FileAdapter(tensors, cfg, info, header_size, entries, layers, ffo, shapes, dtypes)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], AdapterConfig, dict]:
    """Read this library's adapter file or a peft adapter folder (never unpickles).

    Args:
        path: a ``.safetensors`` adapter written by :func:`randlora.save`, a peft RandLora adapter folder,
            or the ``adapter_model.safetensors`` file inside such a folder.

    Returns:
        ``(tensors, settings, info)``: the tensors under this library's keys, the adapter's settings, and
        ``info["format"]`` (``"randlora"`` or ``"peft"``); for peft also ``info["fan_in_fan_out"]`` (the
        folder's flag, which applies to every layer) and ``info["raw"]`` (its ``adapter_config.json``).

    Raises:
        CheckpointError: a folder without ``adapter_config.json``, or an unreadable or corrupt adapter.
        ConfigError: a peft folder with settings this library does not support.
    """
    path = Path(path)
    if path.is_file() and path.name == PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).is_file():
        path = path.parent
    if path.is_dir():
        if not is_peft_folder(path):
            raise CheckpointError(f"{path} is a folder without {PEFT_CONFIG}; pass an adapter .safetensors file "
                                  "or a peft adapter folder")
        tensors, cfg, raw = read_peft(path)
        return tensors, cfg, {"format": "peft", "fan_in_fan_out": bool(raw.get("fan_in_fan_out")), "raw": raw}
    tensors, cfg = read_file(path)
    return tensors, cfg, {"format": "randlora"}


def read_header(path: Path) -> tuple[int, dict]:
    """``(header length, header dict)`` of a safetensors file, read without loading any tensor.

    Raises:
        CheckpointError: the file is missing, truncated or has no valid safetensors header.
    """
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors weight file ({e})") from None
    return n, header


def tensor_entries(header: dict) -> dict[str, dict]:
    """The header's tensor entries (name -> ``dtype``, ``shape``, ``data_offsets``), without its metadata."""
    return {k: v for k, v in header.items() if k != "__metadata__"}


def layer_paths(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The adapted module paths of an adapter's tensors, sorted."""
    return sorted(k[: -len(".randlora_lambda")] for k in tensors if k.endswith(".randlora_lambda"))


def fan_in_fan_out_layers(cfg: AdapterConfig, info: dict, layers: list[str]) -> set[str]:
    """The layers whose weight is stored ``(in, out)`` (GPT-2 ``Conv1D``): listed per layer in this library's
    settings; one flag for every layer in a peft folder."""
    if info["format"] == "randlora":
        return set(cfg.fan_in_fan_out)
    return set(layers) if info["fan_in_fan_out"] else set()


def weight_shapes(base: Path, entries: dict[str, dict], tensors: dict[str, torch.Tensor], cfg: AdapterConfig,
                  layers: list[str], ffo: set[str], prefix: str) -> tuple[dict[str, tuple[int, int]],
                                                                         dict[str, torch.dtype]]:
    """Each adapted layer's ``(O, I)`` and weight dtype, from the weight file's header entries.

    Args:
        base: the weight file (named in errors).
        entries: its header's tensor entries (:func:`tensor_entries`).
        tensors: the adapter's tensors (each layer's ``randlora_gamma`` must fit the weight's shape).
        cfg: the adapter's settings (``r``).
        layers: the adapter's module paths.
        ffo: the layers whose weight is stored ``(in, out)``.
        prefix: prepended to a module path to find ``<prefix><path>.weight`` among ``entries``.

    Returns:
        ``(shapes, dtypes)``, both keyed by module path.

    Raises:
        CheckpointError: a layer's weight is missing, not a 2-D floating-point tensor, or of a shape the
            adapter's ``randlora_gamma`` does not fit.
    """
    missing = [f"{prefix}{p}.weight" for p in layers if f"{prefix}{p}.weight" not in entries]
    if missing:
        some = [k for k in entries if k.endswith(".weight")][:3]
        raise CheckpointError(f"{base} has no tensors {missing[:3]}{' ...' if len(missing) > 3 else ''} for the "
                              f"adapter's layers; its weights are named like {some}. Use --prefix to map the "
                              "adapter's module paths onto the file's keys")
    shapes, dtypes = {}, {}
    for p in layers:
        k = f"{prefix}{p}.weight"
        e = entries[k]
        if len(e["shape"]) != 2 or e["dtype"] not in DTYPES:
            raise CheckpointError(f"{k} in {base} is {e['dtype']} {e['shape']}; a 2-D floating-point weight is needed")
        d0, d1 = e["shape"]
        O, I = (d1, d0) if p in ffo else (d0, d1)
        gam = tensors[f"{p}.randlora_gamma"]
        n = n_bases(min(O, I), cfg.r)
        if tuple(gam.shape) != (n, min(O, I)):
            raise CheckpointError(f"{k} has shape {e['shape']} but the adapter's randlora_gamma for it is "
                                  f"{tuple(gam.shape)} (expected ({n}, {min(O, I)})); wrong base model?")
        shapes[p] = (O, I)
        dtypes[p] = DTYPES[e["dtype"]]
    return shapes, dtypes


def bank_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype :func:`randlora.inject` gives the bank of layers with these weight dtypes: theirs when they
    all share one, else float32."""
    kinds = set(dtypes)
    return kinds.pop() if len(kinds) == 1 else torch.float32


def adapter_bases(tensors: dict[str, torch.Tensor], cfg: AdapterConfig, info: dict,
                  shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's bases, float32: from the adapter when it holds them (checked), else regenerated (verified).

    Args:
        tensors: the adapter's tensors (``randlora_A`` / ``randlora_B`` / fingerprint when saved).
        cfg: the adapter's settings (seed, recipe, bases mode, ``r``).
        info: :func:`read_adapter`'s ``info`` (a peft folder may carry neither bases nor fingerprint).
        shapes: every adapted layer's ``(O, I)``, which size the bank.

    Returns:
        ``(A (r, m_g), B (M_g, n_g, r))``.

    Raises:
        CheckpointError: the stored bases have the wrong shapes or fail their checksum.
        FingerprintMismatch: the regenerated bases are not the ones the adapter's fingerprint names, or
            this library's adapter has neither bases nor fingerprint.
    """
    shape = bank_shape(cfg.recipe, cfg.r, shapes)
    stored = tensors.get(FP)
    if "randlora_A" in tensors:
        A, B = tensors["randlora_A"].float(), tensors["randlora_B"].float()
        if (tuple(A.shape), tuple(B.shape)) != ((shape.r, shape.m), (shape.M, shape.n, shape.r)):
            raise CheckpointError(f"the adapter's bases have shapes A{tuple(A.shape)}, B{tuple(B.shape)} but the "
                                  f"weight file's layers need A({shape.r}, {shape.m}), B({shape.M}, {shape.n}, "
                                  f"{shape.r}); is it the adapter of another model?")
        if stored is not None and bases_checksum(A, B) != int(stored[-1]):
            raise CheckpointError("the adapter's bases do not match its own checksum: the file is corrupt")
        return A, B
    A, B = generate(cfg.recipe, cfg.seed, cfg.bases, shape)
    if stored is not None:
        diff = Fingerprint(cfg.seed, cfg.recipe, cfg.bases, shape.r, shape.M, shape.m,
                           bases_checksum(A, B)).differences(stored)
        if diff:
            raise FingerprintMismatch(f"the adapter was made with other bases than these layers give "
                                      f"({'; '.join(diff)}); is the weight file the adapter's base model?")
    elif info["format"] != "peft":
        raise FingerprintMismatch("the adapter has neither a fingerprint nor bases, so it cannot be verified")
    return A, B
