"""Basis recipes: pure functions ``(seed, mode, r, shape) -> (A, B)`` that make the shared random bases.

A recipe returns ``A`` of shape ``(r, m_g)`` and ``B`` of shape ``(M_g, n_g, r)``, float32, on the CPU.
Every layer uses ``A[:, :m]`` and ``B[:M, :n, :]``.

``"portable"`` (default) is defined by this library bit for bit (see README "Portable bases"):
every entry is a function of ``(seed, tensor, coordinates)`` only, computed with SplitMix64 in NumPy
``uint64`` arithmetic, so it is identical on every OS, CPU, thread count and torch/NumPy version.

``"peft"`` reproduces the ``peft`` package's RandLora bases (torch CPU generator, kaiming-uniform in
bfloat16 then divided by the sample std, or the sparse thresholds) bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import ConfigError

__all__ = [
    "BankShape",
    "MODES",
    "RECIPES",
    "register_recipe",
    "generate",
    "bank_shape",
    "sparsity",
    "DENSE_VARIANCE",
]

MODES = ("dense", "sparse", "very_sparse")


@dataclass(frozen=True)
class BankShape:
    """Global bank shape: ``A`` is ``(r, m_g)``, ``B`` is ``(M_g, n_g, r)``, ``n_g = ceil(m_g / r)``."""

    r: int
    M: int
    m: int

    @property
    def n(self) -> int:
        return -(-self.m // self.r)


def bank_shape(recipe: str, r: int, layer_shapes: list[tuple[int, int]]) -> BankShape:
    """Bank shape covering ``layer_shapes`` (each ``(O, I)``).

    ``portable`` sizes by ``max(max(O, I))`` and ``max(min(O, I))`` over layers (what the slices need);
    ``peft`` follows the peer: element-wise max ``(O_g, I_g)`` first, then max/min of that pair.
    """
    if recipe == "peft":
        O_g = max(o for o, _ in layer_shapes)
        I_g = max(i for _, i in layer_shapes)
        return BankShape(r=r, M=max(O_g, I_g), m=min(O_g, I_g))
    return BankShape(
        r=r,
        M=max(max(o, i) for o, i in layer_shapes),
        m=max(min(o, i) for o, i in layer_shapes),
    )


def sparsity(mode: str, shape: BankShape) -> float:
    """The ``s`` of a ternary mode: ``P(+1) = P(-1) = 1/(2s)``; ``very_sparse`` uses ``sqrt(m_g)``."""
    if mode == "sparse":
        return 3.0
    if mode == "very_sparse":
        return math.sqrt(shape.m)
    raise ConfigError(f"mode {mode!r} is not ternary")


# --------------------------------------------------------------------------------------------------
# portable: SplitMix64, counter-based
# --------------------------------------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_TAG = {"A": 0x41, "B": 0x42}
_CHUNK = 1 << 22  # entries per generation chunk: bounds temporaries to ~100 MB


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 output function (in place on a uint64 array)."""
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def _tensor_key(seed: int, tensor: str) -> np.uint64:
    with np.errstate(over="ignore"):
        z = np.array([(seed & 0xFFFFFFFFFFFFFFFF) ^ (_TAG[tensor] << 56)], dtype=np.uint64)
        return _mix64(z)[0]


def _dense_from_bits(h: np.ndarray) -> np.ndarray:
    """Top 16 bits -> uniform on (-sqrt 3, sqrt 3) (variance 1), rounded to bfloat16, as float32."""
    u = (h >> np.uint64(48)).astype(np.float32)
    x = (u + np.float32(0.5)) * np.float32(2.0**-15) - np.float32(1.0)  # exact in float32
    x *= np.float32(math.sqrt(3.0))
    return torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()


def _ternary_from_bits(h: np.ndarray, s: float) -> np.ndarray:
    """``-1`` if ``h < t``, ``+1`` if ``h >= 2^64 - t``, else 0, with ``t = floor(2^64 / (2s))``."""
    t = np.uint64(min(int(2.0**64 / (2.0 * s)), 2**63))
    out = np.zeros(h.shape, dtype=np.int8)
    out[h < t] = -1
    out[h >= np.uint64(2**64 - int(t))] = 1
    return out


def _portable_ternary_or_dense(mode: str, s: float | None, h: np.ndarray) -> np.ndarray:
    if mode == "dense":
        return _dense_from_bits(h)
    # ternary in {-1, 0, 1} has variance 1/s: scale by sqrt(s) for unit variance
    return _ternary_from_bits(h, s).astype(np.float32) * np.float32(math.sqrt(s))


def _portable_entries(seed: int, tensor: str, index: np.ndarray, mode: str, s: float | None) -> np.ndarray:
    """Entries at the given 64-bit coordinate indices: ``mix64(key + (index + 1) * golden)``."""
    key = _tensor_key(seed, tensor)
    with np.errstate(over="ignore"):
        z = (index + np.uint64(1)) * _GOLDEN + key
        _mix64(z)
    return _portable_ternary_or_dense(mode, s, z)


def portable(seed: int, mode: str, shape: BankShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable bases. Entry coordinates: ``A[k, j]`` has index ``k·2^32 + j``;
    ``B[p, i, k]`` has index ``p·2^40 + i·2^20 + k``."""
    r, M, m, n = shape.r, shape.M, shape.m, shape.n
    if r >= 2**20 or n >= 2**20 or M >= 2**24 or m >= 2**32:
        raise ConfigError(f"bank {shape} is too large for the portable recipe's coordinate encoding")
    s = None if mode == "dense" else sparsity(mode, shape)
    k = np.arange(r, dtype=np.uint64)[:, None] << np.uint64(32)
    j = np.arange(m, dtype=np.uint64)[None, :]
    A = _portable_entries(seed, "A", k | j, mode, s).reshape(r, m)

    B = np.empty((M, n, r), dtype=np.float32)
    inner = (np.arange(n, dtype=np.uint64)[:, None] << np.uint64(20)) | np.arange(r, dtype=np.uint64)[None, :]
    rows = max(1, _CHUNK // (n * r))
    for p0 in range(0, M, rows):
        p = np.arange(p0, min(M, p0 + rows), dtype=np.uint64)[:, None, None] << np.uint64(40)
        B[p0 : p0 + p.shape[0]] = _portable_entries(seed, "B", p | inner[None], mode, s)
    return torch.from_numpy(np.ascontiguousarray(A)), torch.from_numpy(B)


def _exact_dense_variance() -> float:
    u = np.arange(1 << 16, dtype=np.uint64) << np.uint64(48)
    v = _dense_from_bits(u).astype(np.float64)
    return float(np.mean(v * v))


DENSE_VARIANCE: float = _exact_dense_variance()
"""Exact variance of a portable dense entry (the 65536 equally likely bfloat16 values)."""


# --------------------------------------------------------------------------------------------------
# peft: the peer's torch-generator recipe, bit-exact
# --------------------------------------------------------------------------------------------------
def _kaiming_bf16(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.bfloat16)
    with torch.no_grad():
        return torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)


def peft(seed: int, mode: str, shape: BankShape) -> tuple[torch.Tensor, torch.Tensor]:
    """The peer's bases (REFERENCE §2); returned as float32 ``A (r, m_g)``, ``B (M_g, n_g, r)``."""
    r, M, m, n = shape.r, shape.M, shape.m, shape.n
    g = torch.Generator(device="cpu").manual_seed(seed)
    if mode == "dense":
        A = _kaiming_bf16((r, 1, m), g)
        B = torch.cat([_kaiming_bf16((M, 1, r), g) for _ in range(n)], dim=1)
        A, B = A / A.std(), B / B.std()
    else:
        s = sparsity(mode, shape)
        A0 = torch.rand((r, 1, m), generator=g)
        B0 = torch.rand((M, n, r), generator=g)
        A, B = torch.zeros(A0.shape), torch.zeros(B0.shape)
        for src, dst in ((A0, A), (B0, B)):
            dst[src < 1 / (2 * s)] = -1
            dst[src > 1 - 1 / (2 * s)] = 1
        A, B = A / A.std(), B / B.std()
    return A.float().reshape(r, m).contiguous(), B.float().contiguous()


Recipe = Callable[[int, str, BankShape], "tuple[torch.Tensor, torch.Tensor]"]
RECIPES: dict[str, Recipe] = {"portable": portable, "peft": peft}


def register_recipe(name: str, fn: Recipe) -> None:
    """Add a recipe ``fn(seed, mode, shape) -> (A (r, m_g), B (M_g, n_g, r))`` under ``name``."""
    RECIPES[name] = fn


def generate(recipe: str, seed: int, mode: str, shape: BankShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a recipe and check what it returned."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; use one of {sorted(RECIPES)}")
    if mode not in MODES:
        raise ConfigError(f"unknown bases mode {mode!r}; use one of {list(MODES)}")
    A, B = RECIPES[recipe](seed, mode, shape)
    if tuple(A.shape) != (shape.r, shape.m) or tuple(B.shape) != (shape.M, shape.n, shape.r):
        raise ConfigError(f"recipe {recipe!r} returned A{tuple(A.shape)}, B{tuple(B.shape)} for {shape}")
    return A, B
