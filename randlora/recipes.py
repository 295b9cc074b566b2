"""Basis recipes: pure functions ``(seed, mode, r, shape) -> (A, B)`` that make the shared random bases.

A recipe returns ``A`` of shape ``(r, m_g)`` and ``B`` of shape ``(M_g, n_g, r)``, float32, on the CPU.
Every layer uses ``A[:, :m]`` and ``B[:M, :n, :]``.

``"portable"`` (default) is defined by this library bit for bit (see docs/portable-bases.md):
every entry is a function of ``(seed, tensor, coordinates)`` only, computed with SplitMix64 in NumPy
``uint64`` arithmetic, so it is identical on every OS, CPU, thread count and torch/NumPy version.

``"peft"`` reproduces the ``peft`` package's RandLora bases (torch CPU generator, kaiming-uniform in
bfloat16 then divided by the sample std, or the sparse thresholds) bit for bit.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
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
    "n_bases",
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
        return n_bases(self.m, self.r)


def n_bases(m: int, r: int) -> int:
    """``ceil(m / r)``: how many rank-``r`` bases a layer (or bank) of smaller side ``m`` needs."""
    return -(-m // r)


def bank_shape(recipe: str, r: int, layer_shapes: list[tuple[int, int]]) -> BankShape:
    """Bank shape covering ``layer_shapes`` (each ``(O, I)``).

    ``portable`` sizes by ``max(max(O, I))`` and ``max(min(O, I))`` over layers (what the slices need);
    ``peft`` follows peft: element-wise max ``(O_g, I_g)`` first, then max/min of that pair.
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
_CHUNK = 1 << 19  # entries per work item: two uint64 buffers of 4 MB each stay in cache-friendly sizes
_A_ROW_SHIFT = 32  # A[k, j]    -> index k·2^32 + j
_B_ROW_SHIFT = 40  # B[p, i, k] -> index p·2^40 + i·2^20 + k
_B_BASIS_SHIFT = 20


def _mix64(z: np.ndarray, tmp: np.ndarray | None = None) -> np.ndarray:
    """SplitMix64 output function, in place on a uint64 array (``tmp``: optional scratch of the same shape)."""
    if tmp is None:
        tmp = np.empty_like(z)
    for shift, mult in ((30, _M1), (27, _M2), (31, None)):
        np.right_shift(z, np.uint64(shift), out=tmp)
        np.bitwise_xor(z, tmp, out=z)
        if mult is not None:
            np.multiply(z, mult, out=z)
    return z


def _tensor_key(seed: int, tensor: str) -> np.uint64:
    """``key = mix64(seed XOR (tag << 56))``, tag ``0x41`` ('A') or ``0x42`` ('B')."""
    with np.errstate(over="ignore"):
        z = np.array([(seed & 0xFFFFFFFFFFFFFFFF) ^ (_TAG[tensor] << 56)], dtype=np.uint64)
        return _mix64(z)[0]


def _dense_from_bits(h: np.ndarray) -> np.ndarray:
    """Top 16 bits ``u`` -> ``bf16(sqrt(3) · ((u + 0.5) / 2^15 - 1))`` (float32 arithmetic, round to nearest even)."""
    u = (h >> np.uint64(48)).astype(np.float32)
    x = (u + np.float32(0.5)) * np.float32(2.0**-15) - np.float32(1.0)  # exact in float32
    x *= np.float32(math.sqrt(3.0))
    return torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()


# the 65536 possible dense values, indexed by the top 16 bits of the hash
_DENSE_LUT: np.ndarray = _dense_from_bits(np.arange(1 << 16, dtype=np.uint64) << np.uint64(48))


def _ternary_threshold(s: float) -> int:
    """``t = floor(2^64 / (2s))`` (computed in float64, then truncated): ``P(-1) = P(+1) = t / 2^64``."""
    return min(int(2.0**64 / (2.0 * s)), 2**63)


def _fill(dest: np.ndarray, row_part: np.ndarray, col_part: np.ndarray, mode: str, s: float | None) -> None:
    """``dest[a, b] = value(mix64(row_part[a] + col_part[b]))`` for a contiguous float32 ``dest``."""
    z = np.empty(dest.shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.add(row_part[:, None], col_part[None, :], out=z)
        tmp = np.empty_like(z)
        _mix64(z, tmp)
    if mode == "dense":
        np.right_shift(z, np.uint64(48), out=tmp)
        np.take(_DENSE_LUT, tmp.view(np.int64), out=dest)
        return
    t = _ternary_threshold(s)  # type: ignore[arg-type]
    lo, hi = np.empty(z.shape, dtype=np.bool_), np.empty(z.shape, dtype=np.bool_)
    np.less(z, np.uint64(t), out=lo)
    np.greater_equal(z, np.uint64(2**64 - t), out=hi)
    np.subtract(hi, lo, out=dest, dtype=np.float32)
    # ternary in {-1, 0, 1} has variance 2t/2^64 ~ 1/s: scale by sqrt(s) for (very nearly) unit variance
    dest *= np.float32(math.sqrt(s))  # type: ignore[arg-type]


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _generate_rows(dest: np.ndarray, row_index: np.ndarray, col_index: np.ndarray, key: np.uint64, mode: str,
                   s: float | None) -> None:
    """Fill ``dest`` (rows × cols) with entries at 64-bit indices ``row_index[a] + col_index[b]`` (disjoint bits).

    ``mix64(key + (index + 1)·golden)`` is computed as ``row_index·golden + (col_index·golden + golden + key)``
    (mod 2^64), so each row costs one broadcast add. Chunks run on a thread pool (NumPy releases the GIL);
    every entry is a pure function of its index, so the thread count cannot change a bit.
    """
    with np.errstate(over="ignore"):
        row_part = row_index * _GOLDEN
        col_part = col_index * _GOLDEN + _GOLDEN + key
    rows, cols = dest.shape
    step = max(1, _CHUNK // max(cols, 1))
    spans = [(a, min(rows, a + step)) for a in range(0, rows, step)]

    def work(span: tuple[int, int]) -> None:
        a, b = span
        _fill(dest[a:b], row_part[a:b], col_part, mode, s)

    if len(spans) == 1 or _workers() == 1:
        for span in spans:
            work(span)
        return
    with ThreadPoolExecutor(max_workers=_workers()) as ex:
        list(ex.map(work, spans))


def portable(seed: int, mode: str, shape: BankShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable bases. Entry coordinates: ``A[k, j]`` has index ``k·2^32 + j``;
    ``B[p, i, k]`` has index ``p·2^40 + i·2^20 + k`` (see docs/portable-bases.md)."""
    r, M, m, n = shape.r, shape.M, shape.m, shape.n
    if r >= 2**_B_BASIS_SHIFT or n >= 2**(_B_ROW_SHIFT - _B_BASIS_SHIFT) or M >= 2**24 or m >= 2**_A_ROW_SHIFT:
        raise ConfigError(f"bank {shape} is too large for the portable recipe's coordinate encoding "
                          "(needs r < 2^20, n_g < 2^20, M_g < 2^24, m_g < 2^32)")
    s = None if mode == "dense" else sparsity(mode, shape)
    A = np.empty((r, m), dtype=np.float32)
    _generate_rows(A, np.arange(r, dtype=np.uint64) << np.uint64(_A_ROW_SHIFT), np.arange(m, dtype=np.uint64),
                   _tensor_key(seed, "A"), mode, s)
    B = np.empty((M, n * r), dtype=np.float32)
    inner = (np.arange(n, dtype=np.uint64)[:, None] << np.uint64(_B_BASIS_SHIFT)) | np.arange(r, dtype=np.uint64)
    _generate_rows(B, np.arange(M, dtype=np.uint64) << np.uint64(_B_ROW_SHIFT), inner.reshape(-1),
                   _tensor_key(seed, "B"), mode, s)
    return torch.from_numpy(A), torch.from_numpy(B).view(M, n, r)


DENSE_VARIANCE: float = float(np.mean(_DENSE_LUT.astype(np.float64) ** 2))
"""Exact variance of a portable dense entry (the mean of the 65536 equally likely bfloat16 values squared;
the values are symmetric about 0, so the mean is exactly 0)."""


# --------------------------------------------------------------------------------------------------
# peft: peft's torch-generator recipe, bit-exact
# --------------------------------------------------------------------------------------------------
def _kaiming_bf16(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.bfloat16)
    with torch.no_grad():
        return torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)


def peft(seed: int, mode: str, shape: BankShape) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's RandLora bases (torch CPU generator, kaiming-uniform in bfloat16); returned as float32 ``A (r, m_g)``, ``B (M_g, n_g, r)``."""
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
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        # e.g. "peft" divides by the sample std: undefined for a single entry or all-zero sparse draws
        raise ConfigError(f"recipe {recipe!r} made non-finite {mode} bases for {shape} (seed {seed}); the bank is "
                          "too small for it: use recipe='portable', another seed, or target larger layers")
    return A, B
