"""The basis bank: the seeded random bases ``A (r, m_g)`` and ``B (M_g, n_g, r)``, one copy per model.

Every adapted layer reads views of it: ``A[:, :m]`` and ``B[:M, :n, :]`` flattened to ``(M, n·r)``
(a strided view, no copy). The tensors are non-persistent buffers of the model's root
(``randlora_A`` / ``randlora_B``), so ``model.to(...)`` moves the single copy and ``model.state_dict()`` is
unchanged; the bank object itself is a plain attribute ``model.randlora_bank``.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, FingerprintMismatch
from .recipes import MODES, BankShape, generate, n_bases
from .registry import Registry
from .sparse import SparseCache, SparseIndex

BASES = ("randlora_A", "randlora_B")  # the bases' keys in a file or state dict
FP = "randlora_fingerprint"  # the fingerprint's key

__all__ = ["BasisBank", "Fingerprint", "FINGERPRINT_KEYS", "BASES", "FP", "bases_checksum", "layer_views", "stored_bases"]

FORMAT_VERSION = 1


def _recipe_id(recipe: str) -> int:
    return zlib.crc32(recipe.encode()) & 0x7FFFFFFF


# The stored fingerprint, one row per entry in tensor order: (key ``inspect`` prints, name in mismatch
# messages, value). Saved files depend on this order, so a new field can only be appended.
_FIELDS = (
    ("version", "version", lambda f: FORMAT_VERSION),
    ("seed", "seed", lambda f: f.seed),
    ("recipe_id", "recipe", lambda f: _recipe_id(f.recipe)),
    ("mode", "bases mode", lambda f: MODES.index(f.mode)),
    ("r", "r", lambda f: f.r),
    ("M_g", "M_g", lambda f: f.M),
    ("m_g", "m_g", lambda f: f.m),
    ("n_g", "n_g", lambda f: n_bases(f.m, f.r)),
    ("checksum", "checksum", lambda f: f.checksum),
)
FINGERPRINT_KEYS = tuple(key for key, _, _ in _FIELDS)


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a bank: seed, recipe, mode, global shape and a checksum of its float32 bytes."""

    seed: int
    recipe: str
    mode: str
    r: int
    M: int
    m: int
    checksum: int

    def to_tensor(self) -> torch.Tensor:
        """int64 tensor ``[version, seed, crc32(recipe), mode index, r, M_g, m_g, n_g, checksum]``."""
        return torch.tensor([value(self) for _, _, value in _FIELDS], dtype=torch.int64)

    def differences(self, t: torch.Tensor) -> list[str]:
        """Names of the fields in which the stored fingerprint tensor ``t`` differs from this one."""
        t = t.tolist()
        mine = self.to_tensor().tolist()
        if len(t) != len(mine) or t[0] != FORMAT_VERSION:
            return [f"format (stored {t[:1]}, expected [{FORMAT_VERSION}])"]
        show = {
            "recipe": lambda v: next((k for k in ("portable", "peft", self.recipe) if _recipe_id(k) == v), v),
            "bases mode": lambda v: MODES[v] if 0 <= v < len(MODES) else v,
        }
        out = []
        for (_, name, _), a, b in zip(_FIELDS, t, mine):
            if a != b:
                f = show.get(name, lambda v: v)
                out.append(f"{name}: checkpoint {f(a)!r}, model {f(b)!r}")
        return out


def bases_checksum(A: torch.Tensor, B: torch.Tensor) -> int:
    """The first 8 bytes (signed, little-endian) of SHA-256 over the float32 bytes of ``A`` then ``B``."""
    h = hashlib.sha256()
    for t in (A, B):
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def stored_bases(state: Mapping[str, torch.Tensor], need_identity: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The bases an adapter carries, float32, checked against its own fingerprint; None when it carries none.

    The one check every reader makes before it trusts an adapter's bases: stored bases must hash to the
    checksum their fingerprint names (SHA-256, so equal checksums mean equal bases), and an adapter must
    carry a fingerprint or bases.

    Args:
        state: the adapter's tensors.
        need_identity: refuse an adapter with neither fingerprint nor bases (False for peft folders, which
            carry neither when saved without bases).

    Raises:
        CheckpointError: the stored bases do not hash to their fingerprint's checksum (a corrupt file).
        FingerprintMismatch: neither fingerprint nor bases, with ``need_identity``.
    """
    if not all(k in state for k in BASES):
        if need_identity and FP not in state:
            raise FingerprintMismatch("the adapter has neither a fingerprint nor bases, so it cannot be verified "
                                      "against any bases; save it again with this library")
        return None
    A, B = state["randlora_A"].float(), state["randlora_B"].float()
    if FP in state and bases_checksum(A, B) != int(state[FP][-1]):
        raise CheckpointError("the adapter's bases do not match its own fingerprint's checksum: the file is "
                              "corrupt; nothing was loaded. Save it again, or drop randlora_A/randlora_B from it")
    return A, B


def layer_views(A: torch.Tensor, B: torch.Tensor, O: int, I: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's views of a bank: ``A[:, :m]`` and ``B[:M, :n, :]`` flattened to ``(M, n·r)``, no copy.

    Args:
        A: the bank's ``(r, m_g)`` basis.
        B: the bank's ``(M_g, n_g, r)`` basis (contiguous).
        O: the layer's output width.
        I: the layer's input width.
        r: the rank of each basis.

    Returns:
        ``(A[:, :m], B_flat[:M, :n·r])`` with ``m = min(O, I)``, ``M = max(O, I)``, ``n = ceil(m / r)``;
        column ``i·r + k`` of ``B_flat`` is ``B[:, i, k]``.
    """
    m, M = min(O, I), max(O, I)
    return A[:, :m], B.view(B.shape[0], -1)[:M, : n_bases(m, r) * r]


class BasisBank:
    """Shared bases ``A (r, m_g)`` and ``B (M_g, n_g, r)`` generated by ``recipe`` from ``seed``.

    A layer with ``m = min(O, I)``, ``M = max(O, I)``, ``n = ceil(m / r)`` uses ``A[:, :m]`` and
    ``B_flat = B[:M, :n, :].reshape(M, n·r)`` (column ``i·r + k`` is ``B[:, i, k]``).

    The tensors live as non-persistent buffers ``randlora_A`` / ``randlora_B`` of one owner module: the
    model's root once :meth:`attach` ed (so ``model.to(...)``, ``half()``, ``to_empty`` move the single copy
    and ``model.state_dict()`` is unchanged), a private holder before. The bank itself is not a module,
    so it never shows up among a ``Sequential``'s children.
    """

    NAMES = ("randlora_A", "randlora_B")

    def __init__(
        self,
        *,
        seed: int,
        mode: str,
        recipe: str,
        shape: BankShape,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.seed, self.mode, self.recipe, self.shape = int(seed), mode, recipe, shape
        self._checksum: int | None = None
        self.registry: Registry | None = None  # the model's adapters (set by inject)
        # the randlora.mixed block the model is in (serving.Mixed, or serving.Ended until each layer's next call
        # after the block); None outside. Layers read it at each call; no layer holds it
        self.mixed_block = None
        # derived index structures of the ternary bases per layer shape (see sparse_index); never saved
        self._sparse = SparseCache()
        # bumped whenever this library rewrites the bases in place, so caches built from them can tell
        self.generation = 0
        device = torch.device(device if device is not None else "cpu")
        # built on the meta device: fill from the seed on first use after ``to_empty``
        self._pending = device.type == "meta"
        if self._pending:
            A = torch.empty((shape.r, shape.m), dtype=dtype, device="meta")
            B = torch.empty((shape.M, shape.n, shape.r), dtype=dtype, device="meta")
        else:
            A, B = self._canonical()
            A, B = A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)
        self.owner: nn.Module = nn.Module()
        self.owner.register_buffer("randlora_A", A, persistent=False)
        self.owner.register_buffer("randlora_B", B, persistent=False)

    # -- ownership -----------------------------------------------------------------------------
    def attach(self, root: nn.Module) -> None:
        """Move the buffers onto ``root`` (non-persistent), the one place they live."""
        for name in self.NAMES:
            root.register_buffer(name, self.owner._buffers[name], persistent=False)
        self.owner = root
        # every rank makes the same bases from the seed: DistributedDataParallel must not broadcast them
        # (it would send the whole bank each forward); this is the attribute DDP reads for that
        ignore = list(getattr(root, "_ddp_params_and_buffers_to_ignore", ()))
        root._ddp_params_and_buffers_to_ignore = ignore + [n for n in self.NAMES if n not in ignore]

    def detach(self) -> None:
        """Take the buffers off the model's root again."""
        holder = nn.Module()
        for name in self.NAMES:
            holder.register_buffer(name, self.owner._buffers.pop(name), persistent=False)
        ignore = [n for n in getattr(self.owner, "_ddp_params_and_buffers_to_ignore", ()) if n not in self.NAMES]
        if ignore:
            self.owner._ddp_params_and_buffers_to_ignore = ignore
        elif hasattr(self.owner, "_ddp_params_and_buffers_to_ignore"):
            del self.owner._ddp_params_and_buffers_to_ignore
        self.owner = holder

    def _get(self, name: str) -> torch.Tensor:
        t = self.owner._buffers[name]
        if self._pending and not t.is_meta:
            self.regenerate_()
            t = self.owner._buffers[name]
        return t

    @property
    def A(self) -> torch.Tensor:
        return self._get("randlora_A")

    @property
    def B(self) -> torch.Tensor:
        return self._get("randlora_B")

    def _canonical(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate the bases on the CPU in float32 (and record their checksum)."""
        A, B = generate(self.recipe, self.seed, self.mode, self.shape)
        if self._checksum is None:
            self._checksum = bases_checksum(A, B)
        return A, B

    def regenerate_(self) -> None:
        """Refill the buffers from the seed, in place (e.g. after ``to_empty`` from the meta device)."""
        A, B = self._canonical()
        with torch.no_grad():
            self.owner._buffers["randlora_A"].copy_(A)
            self.owner._buffers["randlora_B"].copy_(B)
        self._pending = False
        self.generation += 1
        self._sparse = SparseCache()

    def load_(self, A: torch.Tensor, B: torch.Tensor, checksum: int) -> None:
        """Take bases from a checkpoint (shapes already checked)."""
        with torch.no_grad():
            self.owner._buffers["randlora_A"].copy_(A)
            self.owner._buffers["randlora_B"].copy_(B)
        self._pending = False
        self._checksum = checksum
        self.generation += 1
        self._sparse = SparseCache()

    @property
    def checksum(self) -> int:
        if self._checksum is None:
            self._canonical()
        assert self._checksum is not None
        return self._checksum

    @property
    def fingerprint(self) -> Fingerprint:
        s = self.shape
        return Fingerprint(self.seed, self.recipe, self.mode, s.r, s.M, s.m, self.checksum)

    def check(self, stored: torch.Tensor, what: str = "checkpoint") -> None:
        """Raise :class:`FingerprintMismatch` naming every field that differs from ``stored``."""
        diff = self.fingerprint.differences(stored)
        if diff:
            raise FingerprintMismatch(
                f"the {what} was made with other bases ({'; '.join(diff)}). Inject with the checkpoint's "
                "seed/recipe/bases/targets, or use a checkpoint saved with save_projection=True."
            )

    def views(self, O: int, I: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A[:, :m], B_flat[:M, :n·r])`` for a layer of shape ``(O, I)``; both are views of the bank."""
        return layer_views(self.A, self.B, O, I, self.shape.r)

    @property
    def sparse_indexes(self) -> int:
        """How many layer shapes' :class:`SparseIndex` the bank holds now (built on first use, never saved; a copy
        of the bank starts with none)."""
        return sum(k != "stamp" for k in self._sparse)

    def sparse_index(self, O: int, I: int) -> SparseIndex:
        """The sparse route's index structures for a layer of shape ``(O, I)`` (see :mod:`randlora.sparse`).

        Built on first use from :meth:`views` and memoised per ``(max(O, I), min(O, I))``: one copy per bank,
        shared by every layer of that shape. The memo is dropped whenever the buffers it was built from
        change (moved, cast, replaced or written in place: device, dtype, address and version are checked
        here), and by :meth:`regenerate_` / :meth:`load_`. It is not part of any ``state_dict``.

        Args:
            O: the layer's output width.
            I: the layer's input width.

        Returns:
            A :class:`randlora.sparse.SparseIndex`.

        Raises:
            ConfigError: the bases are dense (every entry non-zero: nothing to skip).
        """
        if self.mode == "dense":
            raise ConfigError("this bank's bases are dense, so the sparse route has nothing to skip; inject with "
                              "bases='sparse' or bases='very_sparse' to use it")
        A, B = self.A, self.B
        stamp = (self.generation, A.device, A.dtype, A.data_ptr(), B.data_ptr(), A._version, B._version)
        if self._sparse.get("stamp") != stamp:
            self._sparse = SparseCache(stamp=stamp)
        key = (max(O, I), min(O, I))
        idx = self._sparse.get(key)
        if idx is None:
            Av, Bv = self.views(O, I)
            idx = self._sparse[key] = SparseIndex(Av, Bv, self.shape.r)
        return idx

    def extra_repr(self) -> str:
        s = self.shape
        return (f"seed={self.seed}, recipe={self.recipe!r}, mode={self.mode!r}, r={s.r}, "
                f"A=({s.r}, {s.m}), B=({s.M}, {s.n}, {s.r})")

    def __repr__(self) -> str:
        return f"BasisBank({self.extra_repr()})"
