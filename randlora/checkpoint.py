"""Adapter checkpoints: the adapter's state dict, and single ``.safetensors`` files (atomic writes).

Keys: ``<module path>.randlora_lambda`` / ``.randlora_gamma`` per layer, ``<path>.bias`` for trained
biases, ``randlora_fingerprint`` (see :class:`randlora.bank.Fingerprint`) and, with
``save_projection=True``, the shared bases ONCE as ``randlora_A`` ``(r, m_g)`` / ``randlora_B`` ``(M_g, n_g, r)``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from .bank import _checksum
from .errors import CheckpointError, FingerprintMismatch
from .walker import AdapterConfig, _require, adapted_layers, bank_of, inject

__all__ = ["state_dict", "load_state_dict", "save", "load", "read_file", "FORMAT"]

FORMAT = "randlora"
BASES = ("randlora_A", "randlora_B")
FP = "randlora_fingerprint"


def state_dict(model: nn.Module, *, save_projection: bool = True) -> dict[str, torch.Tensor]:
    """The adapter's tensors (``λ``, ``γ``, trained biases, fingerprint; bases once if ``save_projection``)."""
    bank = _require(model)
    sd: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model):
        sd[f"{name}.randlora_lambda"] = layer.randlora_lambda.detach()
        sd[f"{name}.randlora_gamma"] = layer.randlora_gamma.detach()
    for name, p in model.named_parameters():
        if p.requires_grad and (name == "bias" or name.endswith(".bias")):
            sd[name] = p.detach()
    if save_projection:
        sd["randlora_A"], sd["randlora_B"] = bank.A.detach(), bank.B.detach()
    sd[FP] = bank.fingerprint.to_tensor()
    return sd


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model):
        out[f"{name}.randlora_lambda"] = layer.randlora_lambda
        out[f"{name}.randlora_gamma"] = layer.randlora_gamma
    for name, p in model.named_parameters():
        if p.requires_grad and (name == "bias" or name.endswith(".bias")):
            out[name] = p
    return out


def load_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Restore an adapter state dict into an injected model, all or nothing.

    Without bases the checkpoint's fingerprint must equal the model bank's; with bases, seed, recipe,
    mode and shapes must agree and the stored bases (verified against their checksum) are copied in.
    """
    bank = _require(model)
    dest = _targets(model)
    problems: list[str] = []
    missing = sorted(set(dest) - set(state))
    unexpected = sorted(set(state) - set(dest) - set(BASES) - {FP})
    if strict and missing:
        problems.append(f"missing keys: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for k in sorted(set(dest) & set(state)):
        if tuple(state[k].shape) != tuple(dest[k].shape):
            problems.append(f"{k}: checkpoint shape {tuple(state[k].shape)}, model {tuple(dest[k].shape)}")
    has_bases = [b in state for b in BASES]
    if any(has_bases) and not all(has_bases):
        problems.append("the checkpoint holds only one of randlora_A / randlora_B")
    if all(has_bases):
        for b, t in zip(BASES, (bank.A, bank.B)):
            if tuple(state[b].shape) != tuple(t.shape):
                problems.append(f"{b}: checkpoint shape {tuple(state[b].shape)}, model bank {tuple(t.shape)}")
    if problems:
        raise CheckpointError("cannot load the adapter, nothing was loaded: " + "; ".join(problems)
                              + ". Inject with the same targets and r as the checkpoint (or load with "
                              "randlora.load on a plain model).")
    if FP not in state:
        if not all(has_bases):
            raise FingerprintMismatch("the checkpoint has neither a fingerprint nor bases, so it cannot be "
                                      "verified against this model's bases; save it again with this library")
    else:
        diff = bank.fingerprint.differences(state[FP])
        if diff and all(has_bases) and all(d.startswith("checksum") for d in diff):
            stored = _checksum(state["randlora_A"].float(), state["randlora_B"].float())
            if stored != int(state[FP][-1]):
                raise CheckpointError("the checkpoint's bases do not match its own checksum: the file is corrupt")
        elif diff:
            bank.check(state[FP])
    with torch.no_grad():
        for k, t in dest.items():
            if k in state:
                t.copy_(state[k])
        if all(has_bases):
            ck = int(state[FP][-1]) if FP in state else _checksum(state["randlora_A"], state["randlora_B"])
            bank.load_(state["randlora_A"], state["randlora_B"], ck)
    for _, layer in adapted_layers(model):
        layer._cache = None


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def _encode_bases(A: torch.Tensor, B: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Lossless compact storage: bfloat16 when exact, int8 codes times a scale for ternary bases."""
    tensors, meta = {}, {}
    for key, t in (("randlora_A", A), ("randlora_B", B)):
        t = t.detach().to("cpu", torch.float32)
        nz = t[t != 0]
        scale = float(nz.abs().max()) if nz.numel() else 1.0
        if nz.numel() and bool((nz.abs() == scale).all()) and scale > 0:
            tensors[key] = torch.round(t / scale).to(torch.int8).contiguous()
            meta[f"{key}.encoding"] = f"ternary:{scale!r}"
        elif torch.equal(t.to(torch.bfloat16).to(torch.float32), t):
            tensors[key] = t.to(torch.bfloat16).contiguous()
            meta[f"{key}.encoding"] = "bfloat16"
        else:
            tensors[key] = t.contiguous()
            meta[f"{key}.encoding"] = "float32"
    return tensors, meta


def _decode_bases(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    for key in BASES:
        if key not in tensors:
            continue
        enc = meta.get(f"{key}.encoding", "float32")
        t = tensors[key]
        if enc.startswith("ternary:"):
            tensors[key] = t.to(torch.float32) * float(enc.split(":", 1)[1])
        else:
            tensors[key] = t.to(torch.float32)


def save(model: nn.Module, path: str | os.PathLike, *, save_projection: bool = True) -> Path:
    """Write the adapter to one ``.safetensors`` file (settings in its metadata), atomically."""
    from safetensors.torch import save_file

    bank = _require(model)
    sd = state_dict(model, save_projection=False)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    meta = {"format": FORMAT, "version": "1", "config": json.dumps(bank.config.to_dict())}
    if save_projection:
        bt, bm = _encode_bases(bank.A, bank.B)
        tensors.update(bt)
        meta.update(bm)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], AdapterConfig]:
    """Read one of this library's adapter files (never unpickles): decoded tensors and settings."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e}); "
                              "is it truncated, or a pickle/.bin file? Only safetensors adapters are read") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a randlora adapter (no randlora metadata); "
                              "for a peft adapter folder use randlora.load_peft")
    try:
        config = AdapterConfig(**json.loads(meta["config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has unreadable adapter settings ({e})") from None
    _decode_bases(tensors, meta)
    return tensors, config


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter file. On a plain model, first injects with the file's settings; returns the model."""
    tensors, cfg = read_file(path)
    injected = False
    if bank_of(model) is None:
        targets = "|".join(re.escape(t) for t in cfg.targets)
        inject(model, targets, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, seed=cfg.seed, bases=cfg.bases,
               recipe=cfg.recipe, bias=cfg.bias)
        injected = True
    try:
        load_state_dict(model, tensors)
    except Exception:
        if injected:
            from .walker import eject

            eject(model)
        raise
    return model
