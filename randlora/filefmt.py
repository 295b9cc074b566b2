"""Adapter files on disk: safetensors reading, the checksum of stored tensors, atomic writes, and the compact
encodings of the shared bases (bfloat16 when exact; ternary bases as 2-bit codes times a scale). Never unpickles."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch

from .bank import BASES, bases_checksum
from .errors import CheckpointError
from .recipes import generate

__all__ = ["read_safetensors", "atomic_write", "digest", "encode_bases", "decode_bases", "file_bases", "pack2",
           "unpack2"]


def file_bases(bank) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 bases the fingerprint's checksum names. A bank kept in a low-precision dtype (bf16/fp16
    model) has rounded ternary scales, so those are regenerated from the seed when that gives the checksum."""
    A, B = bank.A, bank.B
    if A.dtype != torch.float32 and bases_checksum(A, B) != bank.checksum:
        cA, cB = generate(bank.recipe, bank.seed, bank.mode, bank.shape)
        if bases_checksum(cA, cB) == bank.checksum:
            return cA, cB
    return A, B


def pack2(t: torch.Tensor) -> torch.Tensor:
    """Ternary ``t`` (signs only matter) as uint8, 4 entries per byte: entry ``4q + j`` in bits ``2j..2j+1``
    of byte ``q``, code 0 for 0, 1 for +1, 2 for -1 (flat row-major order, last byte zero padded)."""
    codes = torch.zeros(-(-t.numel() // 4) * 4, dtype=torch.uint8)
    flat = t.reshape(-1)
    codes[: flat.numel()][flat > 0] = 1
    codes[: flat.numel()][flat < 0] = 2
    c = codes.view(-1, 4)
    return (c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)).contiguous()


def unpack2(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack2`: float32 in ``{-1, 0, 1}`` of ``shape``."""
    numel = 1
    for d in shape:
        numel *= d
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-numel // 4):
        raise ValueError(f"2-bit ternary data of {packed.numel()} {packed.dtype} values cannot hold shape {shape}")
    codes = torch.stack([(packed >> (2 * j)) & 3 for j in range(4)], dim=1).reshape(-1)[:numel]
    if bool((codes == 3).any()):
        raise ValueError("2-bit ternary data holds the invalid code 3")
    lut = torch.tensor([0.0, 1.0, -1.0, 0.0], dtype=torch.float32)
    return lut[codes.long()].reshape(shape)


def encode_bases(A: torch.Tensor, B: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Lossless compact storage: bfloat16 when exact; ternary bases as 2-bit codes (4 per byte) times a scale."""
    tensors, meta = {}, {}
    for key, t in (("randlora_A", A), ("randlora_B", B)):
        t = t.detach().to("cpu", torch.float32)
        nz = t[t != 0]
        scale = float(nz.abs().max()) if nz.numel() else 1.0
        if nz.numel() and bool((nz.abs() == scale).all()) and scale > 0:
            tensors[key] = pack2(t)
            meta[f"{key}.encoding"] = f"ternary2:{scale!r}:{'x'.join(map(str, t.shape))}"
        elif torch.equal(t.to(torch.bfloat16).to(torch.float32), t):
            tensors[key] = t.to(torch.bfloat16).contiguous()
            meta[f"{key}.encoding"] = "bfloat16"
        else:
            tensors[key] = t.contiguous()
            meta[f"{key}.encoding"] = "float32"
    return tensors, meta


def decode_bases(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    for key in BASES:
        if key not in tensors:
            continue
        enc = meta.get(f"{key}.encoding", "float32")
        t = tensors[key]
        if enc.startswith("ternary2:"):
            _, scale, shape = enc.split(":")
            tensors[key] = unpack2(t, tuple(int(d) for d in shape.split("x"))) * float(scale)
        elif enc.startswith("ternary:"):  # int8 codes (files written before 2-bit packing)
            tensors[key] = t.to(torch.float32) * float(enc.split(":", 1)[1])
        else:
            tensors[key] = t.to(torch.float32)


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every stored tensor (name, dtype, shape, bytes) in name order: any flipped byte of
    ``λ``, ``γ``, biases, fingerprint or encoded bases changes it."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    On any failure the temporary file is removed and an existing ``path`` is left as it was."""
    tmp = _new_file_beside(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _new_file_beside(path: Path) -> str:
    """A new empty file ``.<name>.<random>.tmp`` in ``path``'s folder, with the permissions ``open(path, "w")``
    would give (``0o666`` less the umask): the rename keeps them, and ``mkstemp``'s owner-only mode would
    hide a merged weight file or a config from the other users of a shared machine."""
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e}); "
                              "is it truncated, or a pickle/.bin file? Only safetensors adapters are read") from None
    return tensors, meta
