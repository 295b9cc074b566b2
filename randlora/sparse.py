"""The sparse route of the op: ternary bases (``bases="sparse"`` / ``"very_sparse"``) at the cost of their non-zeros.

With ``S[k·n + i, j] = λ[k, i] · A[k, j] · γ[i, j]`` (``(r·n, m)``), ``B_flat`` the layer's ``(M, n·r)`` bank view
and ``P = B_flat @ S`` (``ΔW = P`` when ``I <= O``, else ``Pᵀ``), the activation route ``y = x Wᵀ + b + s·x ΔWᵀ``
and its backward only ever need the bases' non-zeros:

* ``S``'s pattern is ``A``'s, repeated for each of the ``n`` bases: row ``k·n + i`` is non-zero only at the
  columns ``J_k`` where ``A[k]`` is. Its values change every step (``λ``, ``γ``) but are only
  ``n·nnz(A)`` numbers, recomputed per call with three gathers; its pattern is fixed.
* ``B_flat`` is a fixed sparse matrix.
* Every product of ``S``, ``Sᵀ``, ``B_flat`` or ``B_flatᵀ`` with an activation is one ``embedding_bag``
  (sum mode, per-entry weights), i.e. a CSR × dense product over the non-zeros only.
* ``∂S`` is needed only at ``S``'s pattern (a sampled product): gather the ``J_k`` columns of the activation
  (``(r, J, T)``, ``J = max_k |J_k|``, padded with zero weights) and run one batched matmul, ``(n, J)`` per
  ``k``; then reduce against ``A``, ``γ`` and ``λ`` (``index_add_`` for ``∂γ``).

Everything runs in token-major layout (``xᵀ``, ``(·, T)``): the sparse products then read and write whole rows.
Backward saves only ``x``, ``λ``, ``γ``, ``W`` and a reference to the bank's index structures; it keeps no
``T × n·r`` tensor (when ``O < I`` the product ``x B_flat`` is recomputed in backward for ``∂S``: one extra
sparse product instead of a ``T × n·r`` activation kept through the step).

The index structures (:class:`SparseIndex`) are built once per bank and layer shape by
:meth:`randlora.bank.BasisBank.sparse_index`, shared by every layer of that shape, rebuilt when the bank's
buffers move or change dtype, and never stored in a ``state_dict`` or checkpoint.

The kernels were picked by measurement on a 2-core CPU (see ``docs/sparse.md``): ``embedding_bag`` was
2–4× faster than torch's CSR matmul (MKL) for the same products and as fast as gather + ``bmm`` for ``S``
without its padding; all of them exist on CUDA.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

from . import planner
from .errors import ConfigError
from .ops import (grad_epilogue, grad_prologue, needs, on_rows, out_features, presign, reduce_grads, scratch,
                  threads, untracked)
from .planner import Route

__all__ = [
    "SparseIndex",
    "SparseCache",
    "sparse_randlora_linear",
    "grouped_terms",
    "sparse_delta",
    "SparseRandLoraFunction",
]


class SparseCache(dict):
    """The bank's memo of :class:`SparseIndex` per layer shape (plus a ``"stamp"`` of the buffers it was
    built from). Derived data: a deep copy or a pickle of the bank starts with an empty one, rebuilt from the
    bases on first use, so a copy never carries (or shares) structures of buffers it does not hold."""

    def __deepcopy__(self, memo: dict) -> "SparseCache":
        return SparseCache()

    def __reduce__(self) -> tuple:
        return (SparseCache, ())


class SparseIndex:
    """Index structures of one layer shape's bank views ``A[:, :m]`` and ``B_flat[:M, :n·r]``.

    Every sparse × dense product is one ``embedding_bag`` (``mode="sum"`` with per-entry weights: row ``p`` of
    the result is ``Σ_e w_e · dense[idx_e]`` over the entries ``e`` of bag ``p``), so each matrix is kept as
    ``(offsets, indices, weights)`` in CSR order: ``B_flat`` and ``B_flatᵀ`` with their fixed values; ``S``
    (rows ``k·n + i``, columns ``J_k``) and ``Sᵀ`` whose weights are made per call from ``λ``, ``γ``.

    Attributes:
        r, n, m, M: the slice's shape (``A`` is ``(r, m)``, ``B_flat`` is ``(M, n·r)``).
        J: the most non-zeros in a row of ``A``; ``cols`` ``(r·J,)`` are each row's non-zero columns, padded
            with column 0, and ``vals`` ``(r, J)`` ``A``'s values there (0 at pads): the sampled ``∂S`` product.
        nnz_A, nnz_B, density_A, density_B: the slices' non-zeros and fractions of non-zeros.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, r: int) -> None:
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] % r:
            raise ConfigError(f"sparse index needs A (r, m) and B_flat (M, n·r) with r={r}; got A{tuple(A.shape)}, "
                              f"B{tuple(B.shape)}")
        self.r, self.m = A.shape
        self.M, nr = B.shape
        self.n = nr // r
        if self.n != -(-self.m // r):
            raise ConfigError(f"B_flat has {nr} columns; a layer of width {self.m} at r={r} needs n·r = "
                              f"{-(-self.m // r) * r}")
        self.dtype, self.device = A.dtype, A.device
        dev, n, m = A.device, self.n, self.m
        with torch.no_grad():
            nz = A != 0
            counts = nz.sum(1)
            J = max(int(counts.max().item()), 1)
            # stable sort puts each row's non-zero columns first, in increasing order
            order = torch.sort(nz.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :J]
            keep = torch.arange(J, device=dev)[None, :] < counts[:, None]
            self.cols = torch.where(keep, order, torch.zeros_like(order)).reshape(-1).contiguous()
            self.vals = torch.where(keep, A.gather(1, order), torch.zeros((), dtype=A.dtype, device=dev))
            self.J = J
            # S's entries (k, i, q), q < counts[k], in row order c = k·n + i
            kk, qq = keep.nonzero(as_tuple=True)  # A's non-zeros, row-major
            jj = order[kk, qq]
            a = A[kk, jj]
            nnzA = kk.numel()
            ent_k = kk[None, :].expand(n, nnzA)
            ent_i = torch.arange(n, device=dev)[:, None].expand(n, nnzA)
            ent_j = jj[None, :].expand(n, nnzA)
            ent_a = a[None, :].expand(n, nnzA)
            # sort (i, e) -> row c = k·n + i (stable: columns stay increasing within a row)
            c = (ent_k * n + ent_i).reshape(-1)
            perm = torch.argsort(c, stable=True)
            self.s_row = c[perm]
            self.s_cols = ent_j.reshape(-1)[perm].contiguous()
            self.s_a = ent_a.reshape(-1)[perm].contiguous()
            self.s_gam = (ent_i.reshape(-1)[perm] * m + self.s_cols).contiguous()  # flat index into γ (n, m)
            self.s_offs = _offsets(self.s_row, r * n)
            # Sᵀ: the same entries sorted by column j
            tperm = torch.argsort(self.s_cols, stable=True)
            self.t_perm = tperm
            self.t_src = self.s_row[tperm].contiguous()  # row of S (= index into the (n·r, T) operand)
            self.t_offs = _offsets(self.s_cols[tperm], m)
            self.b_offs, self.b_idx, self.b_val = _csr_parts(B)
            self.a_offs, self.a_idx, self.a_val = _csr_parts(A)
            self.at_offs, self.at_idx, self.at_val = _csr_parts(A.t())
            self.bt_offs, self.bt_idx, self.bt_val = _csr_parts(B.t())
            self.nnz_A = int(nnzA)
            self.nnz_B = int(self.b_idx.numel())
        self.density_A = self.nnz_A / max(A.numel(), 1)
        self.density_B = self.nnz_B / max(B.numel(), 1)
        self._cast: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}

    @functools.cached_property
    def s_flat(self) -> torch.Tensor:
        """The flat positions of ``S``'s entries (CSR order) in a dense ``(n·r, m)`` matrix (:func:`sparse_delta`)."""
        return self.s_row * self.m + self.s_cols

    @functools.cached_property
    def bt_flat(self) -> torch.Tensor:
        """The flat positions of ``B_flatᵀ``'s entries (CSR order) in a dense ``(n·r, M)`` matrix."""
        rows = torch.repeat_interleave(torch.arange(self.r * self.n, device=self.device), self.bt_offs.diff())
        return rows * self.M + self.bt_idx

    def out_features(self, I: int) -> int:
        """``O`` of an adapter-only call (``W`` None) with input width ``I``, as in ``ops``."""
        if I not in (self.m, self.M):
            raise ConfigError(f"input width {I} does not match this sparse index (layer widths {self.m}, {self.M})")
        return out_features(I, self.m, self.M)

    def operands(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``(vals, s_a, b_val, bt_val, a_val, at_val)`` in ``dtype`` (memoised)."""
        got = self._cast.get(dtype)
        if got is None:
            got = self._cast[dtype] = tuple(t.to(dtype) for t in (self.vals, self.s_a, self.b_val, self.bt_val,
                                                                  self.a_val, self.at_val))
        return got

    def __repr__(self) -> str:
        return (f"SparseIndex(r={self.r}, n={self.n}, m={self.m}, M={self.M}, J={self.J}, "
                f"density_A={self.density_A:.4f}, density_B={self.density_B:.4f}, device={self.device})")


def _offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR offsets ``(n_rows + 1,)`` of sorted row ids."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _csr_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(offsets, column indices, values)`` of a dense 2-D tensor's non-zeros, row-major."""
    rows, cols = (t != 0).nonzero(as_tuple=True)
    return _offsets(rows, t.shape[0]), cols.contiguous(), t[rows, cols].contiguous()


# ------------------------------------------------------------------------------------------------
# kernels (token-major: activations as (width, T))
# ------------------------------------------------------------------------------------------------
def _work_dtype(idx: SparseIndex, cd: torch.dtype) -> torch.dtype:
    """The dtype the sparse products sum in (:func:`randlora.planner.work_in_float32`)."""
    return torch.float32 if planner.work_in_float32(idx.device.type, cd.itemsize) else cd


# CPU: activations are laid out token-major in blocks of tokens, ``(n_blocks, width, block)``, and the sparse
# products run block by block, chained (``x → S → B_flat``), so that the rows they gather and the intermediate
# ``(n·r, block)`` stay in cache. The block (``TOKEN_BLOCK``: 64 tokens with one torch thread, 512 with more;
# one block of all tokens off the CPU) is the planner's (``Route.block``, ``planner.DEVICE_COSTS``). Measured on
# one layer's adapter work (benchmarks/sparse_op.py, fp32, very_sparse, widths 1024–2816, T = 1024–4096):
# with one thread, blocks of 64 tokens were 1.3–1.6x faster than blocks of 512 at 5 of the 6 shapes; with two
# threads on a busy 2-core machine each block's parallel regions cost more than the cache gains, and 64 was
# 2.5x slower than 512 (1024×2816, T = 4096).
def _buffer(role: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The token-block transient ``role``: the thread's scratch buffer (see :func:`randlora.ops.scratch`) or fresh."""
    buf = scratch(role, shape, dtype, device)
    return buf if buf is not None else torch.empty(shape, dtype=dtype, device=device)


def _to_blocks(t: torch.Tensor, c: int, wd: torch.dtype) -> torch.Tensor:
    """``(T, K)`` -> ``(ceil(T / c), K, c)`` contiguous in ``wd`` (scratch ``"in"``); tokens past ``T`` are zero."""
    T, K = t.shape
    nb, full, rem = -(-T // c), T // c, T % c
    out = _buffer("in", (nb, K, c), wd, t.device)
    if full:
        out[:full].copy_(t[: full * c].reshape(full, c, K).transpose(1, 2))  # (a view when t is contiguous)
    if rem:
        out[full, :, rem:].zero_()
        out[full, :, :rem].copy_(t[full * c :].t())
    return out


def _from_blocks(y: torch.Tensor, b: torch.Tensor, add: bool) -> torch.Tensor:
    """``y (T, K) (+)= `` the tokens of blocks ``b (nb, K, c)``, in place."""
    T, K = y.shape
    c = b.shape[2]
    full, rem = T // c, T % c
    op = torch.Tensor.add_ if add else torch.Tensor.copy_
    if full:
        op(y[: full * c].view(full, c, K), b[:full].transpose(1, 2))
    if rem:
        op(y[full * c :], b[full, :, :rem].t())
    return y


def _spmm(offs: torch.Tensor, cols: torch.Tensor, w: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``X @ dense`` for the sparse ``X`` given as CSR ``(offs, cols, w)``; ``dense`` is ``(K, c)`` contiguous."""
    return F.embedding_bag(cols, dense, offs, mode="sum", per_sample_weights=w, include_last_offset=True)


def _chain(xb: torch.Tensor, mats: list, keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply the sparse matrices ``mats`` (each ``(offs, cols, w)``) in turn to every block of ``xb``.

    Returns the last product's blocks and, with ``keep = i``, the blocks of product ``i`` too."""
    nb, _, c = xb.shape
    out = _buffer("out", (nb, mats[-1][0].numel() - 1, c), xb.dtype, xb.device)
    kept = _buffer("mid", (nb, mats[keep][0].numel() - 1, c), xb.dtype, xb.device) if keep is not None else None
    for b in range(nb):
        t = xb[b]
        for i, (offs, cols, w) in enumerate(mats):
            t = _spmm(offs, cols, w, t)
            if i == keep:
                kept[b] = t
        out[b] = t
    return out, kept


def _S(idx: SparseIndex, w: torch.Tensor) -> tuple:
    """``S`` (``(m) -> (n·r)``) as CSR parts."""
    return idx.s_offs, idx.s_cols, w


def _ST(idx: SparseIndex, w: torch.Tensor) -> tuple:
    """``Sᵀ`` (``(n·r) -> (m)``) as CSR parts."""
    return idx.t_offs, idx.t_src, w.index_select(0, idx.t_perm)


def _s_weights(lam: torch.Tensor, gam: torch.Tensor, idx: SparseIndex, s_a: torch.Tensor,
               wd: torch.dtype) -> torch.Tensor:
    """``S``'s values in CSR order: ``λ[k, i] · A[k, j] · γ[i, j]``."""
    return lam.to(wd).reshape(-1).index_select(0, idx.s_row) * s_a * gam.to(wd).reshape(-1).index_select(0, idx.s_gam)


def _sampled(blocks: torch.Tensor, dense: torch.Tensor, idx: SparseIndex, wd: torch.dtype) -> torch.Tensor:
    """``∂S`` at ``S``'s pattern, ``(r, n, J)``: ``Σ_t blocks[c, t] · dense[t, J_k]`` for row ``c = k·n + i``.

    ``blocks`` is ``(nb, n·r, c)`` token blocks (zero past ``T``), ``dense`` the ``(T, m)`` other factor."""
    nb, nr, c = blocks.shape
    T = dense.shape[0]
    r, n, J = idx.r, idx.n, idx.J
    g = blocks.view(nb, r, n, c).permute(1, 2, 0, 3).reshape(r, n, nb * c)[:, :, :T]
    # columns J_k of dense as an (r, T, J) view of one (T, r·J) gather: the row stride r·J is a plain
    # leading dimension for the batched matmul, so no transposed copy
    d = dense.to(wd).index_select(1, idx.cols).view(T, r, J).transpose(0, 1)
    return torch.bmm(g, d)


def _grad_x(gy: torch.Tensor, W: torch.Tensor | None, dxb: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    T, I = gy.shape[0], dxb.shape[1]
    if W is not None:
        return _from_blocks(torch.mm(gy, W.to(cd)), dxb, add=True)
    return _from_blocks(torch.empty(T, I, dtype=cd, device=gy.device), dxb, add=False)


def _backward_widening(idx, gy, x, W, w, s, c, wd, need_x, need_S):
    """``O >= I``: ``gy → B_flatᵀ`` (kept for ``∂S``) ``→ Sᵀ`` (``∂x``). Returns ``(∂x, ∂S)``."""
    _, _, _, bt_val, *_ = idx.operands(wd)
    BT = (idx.bt_offs, idx.bt_idx, bt_val)
    gyb = _to_blocks(gy, c, wd)
    if need_x:
        dxb, gtb = _chain(gyb, [BT, _ST(idx, w * s)], keep=0)
    else:
        (gtb, _), dxb = _chain(gyb, [BT]), None
    del gyb
    dS = _sampled(gtb, x, idx, wd) if need_S else None  # (r, n, J)
    del gtb
    return (_grad_x(gy, W, dxb, x.dtype) if need_x else None), dS


def _backward_narrowing(idx, gy, x, W, w, s, c, wd, need_x, need_S):
    """``O < I``: ``gy → S → B_flat`` (``∂x``); ``x B_flat`` recomputed for ``∂S``. Returns ``(∂x, ∂S)``."""
    _, _, b_val, bt_val, *_ = idx.operands(wd)
    gx = dS = None
    if need_x:
        dxb, _ = _chain(_to_blocks(gy, c, wd), [_S(idx, w), (idx.b_offs, idx.b_idx, b_val * s)])
        gx = _grad_x(gy, W, dxb, x.dtype)
        del dxb  # (the scratch buffers are reused below)
    if need_S:  # x B_flat is recomputed: nothing T × n·r is kept from forward
        vb, _ = _chain(_to_blocks(x, c, wd), [(idx.bt_offs, idx.bt_idx, bt_val)])
        dS = _sampled(vb, gy, idx, wd)  # (r, n, J)
    return gx, dS


class _SparseOp(torch.autograd.Function):
    """The sparse op on a planned :class:`~randlora.planner.Route` (see :class:`SparseRandLoraFunction`)."""

    @staticmethod
    def forward(x, W, bias, lam, gam, idx, s, route):  # type: ignore[override]
        cd = x.dtype
        T, I = x.shape
        O = W.shape[0] if W is not None else idx.out_features(I)
        _check(idx, lam, gam, O, I)
        wd = _work_dtype(idx, cd)
        _, s_a, b_val, bt_val, *_ = idx.operands(wd)
        w = _s_weights(lam, gam, idx, s_a, wd)
        xb = _to_blocks(x, route.block or max(T, 1), wd)
        # s is folded into the weights of the last sparse product (a few thousand numbers, not T × O)
        if O >= I:  # ΔW = B_flat S: x → S → B_flat
            mats = [_S(idx, w), (idx.b_offs, idx.b_idx, b_val * s)]
        else:  # ΔW = Sᵀ B_flatᵀ: x → B_flatᵀ → Sᵀ
            mats = [(idx.bt_offs, idx.bt_idx, bt_val), _ST(idx, w * s)]
        db, _ = _chain(xb, mats)  # s·(x ΔWᵀ) in token blocks
        del xb
        bc = bias.to(cd) if bias is not None else None
        if W is None:
            y = _from_blocks(torch.empty(T, O, dtype=cd, device=x.device), db, add=False)
            return y.add_(bc) if bc is not None else y
        return _from_blocks(F.linear(x, W.to(cd), bc), db, add=True)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, W, bias, lam, gam, idx, s, route = inputs
        ctx.save_for_backward(x, W, lam, gam)
        ctx.idx, ctx.s, ctx.route = idx, s, route

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, W, lam, gam = ctx.saved_tensors
        idx, s = ctx.idx, ctx.s
        need, gy = grad_prologue(ctx, gy, x)
        need_x, need_S = need[0], need[3] or need[4]
        T, I = x.shape
        wd = _work_dtype(idx, x.dtype)
        vals, s_a, *_ = idx.operands(wd)
        c = ctx.route.block or max(T, 1)
        gx = dlam = dgam = None
        if need_x or need_S:
            w = _s_weights(lam, gam, idx, s_a, wd) if need_x else None
            grads = _backward_widening if gy.shape[1] >= I else _backward_narrowing
            gx, dS = grads(idx, gy, x, W, w, s, c, wd, need_x, need_S)
            if need_S:
                dlam, dgam = reduce_grads(dS, lam, gam, vals, s, need[3], need[4], cols=idx.cols)
        gW, gb = grad_epilogue(gy, x, W, need)
        return gx, gW, gb, dlam, dgam, None, None, None


def _group_term(idx: SparseIndex, z: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, s: float,
                widening: bool, ops: tuple, scaled: bool) -> torch.Tensor:
    """One adapter's ``S`` (``widening``: ``z`` is its tokens of ``xᵀ``, returns ``(n·r, T_g)``) or ``Sᵀ`` product
    (``z`` its tokens of ``(x B_flat)ᵀ``, returns ``(m, T_g)``), in ``z``'s dtype; ``scaled``: through ``A`` with
    ``γ`` and ``λ`` scaling the activations (an ``n × m × T_g`` temporary) instead of the adapter's own ``S``
    (three gathers of its ``n·nnz(A)`` values)."""
    r, n, m, T_g, wd = idx.r, idx.n, idx.m, z.shape[1], z.dtype
    s_a, a_val, at_val = ops
    if not scaled:
        w = _s_weights(lam, gam, idx, s_a, wd) * s
        return _spmm(*(_S(idx, w) if widening else _ST(idx, w)), z)
    lam_s, gam_t = (lam.to(wd) * s)[:, :, None], gam.to(wd).t()[:, :, None]  # (r, n, 1), (m, n, 1)
    if widening:  # row k·n + i of token t: s·λ[k, i] Σ_j A[k, j] γ[i, j] x[j, t]
        u = (gam_t * z[:, None, :]).reshape(m, -1)  # (m, n·T_g)
        return (_spmm(idx.a_offs, idx.a_idx, a_val, u).view(r, n, T_g) * lam_s).view(r * n, T_g)
    v = (z.view(r, n, T_g) * lam_s).reshape(r, -1)  # column j of token t: Σ_i γ[i, j] Σ_k A[k, j] s·λ[k, i] z[k·n + i, t]
    return (_spmm(idx.at_offs, idx.at_idx, at_val, v).view(m, n, T_g) * gam_t).sum(1)


def grouped_terms(x: torch.Tensor, idx: SparseIndex, O: int, groups: list, block: int | None = None,
                  scaled_below: float = 0.0, work_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Σ_g s_g · x_g ΔW_gᵀ`` for several adapters at once, each on its own tokens, through the bases' non-zeros
    (no autograd: the serving pass of :func:`randlora.mixed`).

    The tokens of every group are taken group after group, in windows of ``block`` tokens (the op's token block,
    so that a window's products stay in cache; None: one window); per window the ``B_flat`` product, the same for
    every adapter, runs once, and only the product with ``S`` (``λ``, ``A``, ``γ``) runs per group on its part of
    the window (:func:`_group_term`; for a part of fewer than ``scaled_below`` tokens ``γ`` and ``λ`` scale the
    activations around a product with ``A`` instead of building the adapter's ``S``). Tokens of no group get 0.
    The window, the side and the work dtype are the caller's plan (:class:`randlora.planner.MixedPlan`).

    Args:
        x: ``(T, I)`` in the compute dtype.
        idx: ``bank.sparse_index(O, I)``.
        O: the layer's output width.
        groups: ``(λ, γ, s, tokens)`` per adapter, ``tokens`` a long tensor of distinct token positions (rows of
            ``x``), disjoint between groups.
        block: tokens per window (None: all at once).
        scaled_below: a group's part of a window with fewer tokens takes the scaled side.
        work_dtype: the dtype the products sum in (default ``x``'s).

    Returns:
        ``(T, O)`` in ``x``'s dtype.
    """
    T, I = x.shape
    cd = x.dtype
    wd = cd if work_dtype is None else work_dtype
    _, s_a, b_val, bt_val, a_val, at_val = idx.operands(wd)
    every = torch.cat([g[3] for g in groups])
    ends = list(itertools.accumulate(g[3].numel() for g in groups))
    spans = list(zip([0] + ends[:-1], ends))
    y = x.new_zeros(T, O)
    c = block or every.numel()
    for w0 in range(0, every.numel(), c):
        w1 = min(w0 + c, every.numel())
        xa = x.index_select(0, every[w0:w1]).t().to(wd).contiguous()  # token-major (I, window)
        z = xa if O >= I else _spmm(idx.bt_offs, idx.bt_idx, bt_val, xa)  # (I, ·), or x B_flat: (n·r, ·)
        ya = torch.cat([_group_term(idx, z[:, max(a, w0) - w0:min(b, w1) - w0].contiguous(), lam, gam, s, O >= I,
                                    (s_a, a_val, at_val), min(b, w1) - max(a, w0) < scaled_below)
                        for (lam, gam, s, _), (a, b) in zip(groups, spans) if a < w1 and b > w0], dim=1)
        if O >= I:
            ya = _spmm(idx.b_offs, idx.b_idx, b_val, ya)
        y.index_copy_(0, every[w0:w1], ya.t().to(cd))
    return y


def sparse_delta(idx: SparseIndex, lam: torch.Tensor, gam: torch.Tensor, s: float, transposed: bool,
                 dtype: torch.dtype, W: torch.Tensor | None = None) -> torch.Tensor:
    """``s·ΔW`` (``W + s·ΔW`` when ``W`` is given) through the bases' non-zeros, as ``(O, I)`` in ``dtype``.

    ``I <= O``: ``ΔW = B_flat S``, ``B_flat``'s sparse rows over ``S`` written out dense; ``O < I``
    (``transposed``): ``ΔW = Sᵀ B_flatᵀ``, ``Sᵀ``'s sparse rows over ``B_flatᵀ`` written out dense. Either way
    ``M·n·r·m·density_B`` multiply-adds where the dense views' build (:func:`randlora.ops.delta_weight`) does
    ``M·n·r·m``; the sums run in float32 (float64 for float64) and ``s`` is folded into ``S``'s values.
    Differentiable in ``λ``, ``γ`` and ``W``.

    Args:
        idx: ``bank.sparse_index(O, I)``.
        lam, gam: ``λ`` ``(r, n)`` and ``γ`` ``(n, m)``.
        s: the scale ``alpha / r``.
        transposed: ``O < I``.
        dtype: the result's dtype.
        W: the frozen weight ``(O, I)``, or None.

    Returns:
        ``(O, I)`` in ``dtype``.
    """
    wd = torch.float64 if dtype == torch.float64 else torch.float32
    _, s_a, b_val, bt_val, _, _ = idx.operands(wd)
    nr, m, M = idx.r * idx.n, idx.m, idx.M
    w = _s_weights(lam, gam, idx, s_a, wd) * s
    if transposed:
        table = _dense_table("Bt", nr, M, idx.bt_flat, bt_val)
        D = _spmm(*_ST(idx, w), table)
    else:
        D = _spmm(idx.b_offs, idx.b_idx, b_val, _dense_table("S", nr, m, idx.s_flat, w))
    if W is not None:
        D = D.add_(W.to(wd))  # (D is not saved for backward: in place is safe)
    return D.to(dtype)


def _dense_table(role: str, rows: int, cols: int, flat: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """A ``(rows, cols)`` matrix that is ``vals`` at the flat positions ``flat`` and 0 elsewhere (in the thread's
    scratch buffer when not recording gradients, see :func:`randlora.ops.scratch`)."""
    buf = scratch(f"dense {role}", (rows * cols,), vals.dtype, vals.device)
    buf = buf.zero_() if buf is not None else vals.new_zeros(rows * cols)
    return buf.index_put_((flat,), vals).view(rows, cols)


def _check(idx: SparseIndex, lam: torch.Tensor, gam: torch.Tensor, O: int, I: int) -> None:
    if (min(O, I), max(O, I)) != (idx.m, idx.M):
        raise ConfigError(f"layer ({O} × {I}) does not match the sparse index ({idx.M} × {idx.m}): fetch it with "
                          "bank.sparse_index(O, I)")
    if tuple(lam.shape) != (idx.r, idx.n) or tuple(gam.shape) != (idx.n, idx.m):
        raise ConfigError(f"λ{tuple(lam.shape)} / γ{tuple(gam.shape)} do not fit the sparse index (λ must be "
                          f"({idx.r}, {idx.n}), γ ({idx.n}, {idx.m}))")
    if lam.device != idx.device:
        raise ConfigError(f"the sparse index is on {idx.device} but the parameters are on {lam.device}: fetch it "
                          "again with bank.sparse_index(O, I) after moving the model")


def _route_of(x: torch.Tensor, W: torch.Tensor | None, lam: torch.Tensor, gam: torch.Tensor) -> Route:
    """The route of a direct call of the sparse op (the layer plans its calls itself)."""
    need_x, need_S, need_W = needs(x, W, lam, gam)
    return planner.sparse_op_route(x.shape[0], x.device.type, threads(x.device.type), need_x=need_x,
                                   need_S=need_S, need_W=need_W)


presign(_SparseOp)


class SparseRandLoraFunction(_SparseOp):
    """``y = x (W + s·ΔW)ᵀ + b`` through the bases' non-zeros (``W`` None: ``y = s · x ΔWᵀ (+ b)``).

    ``SparseRandLoraFunction.apply(x, W, bias, lam, gam, idx, s, route=None)``: ``x`` is ``(T, I)`` in the
    compute dtype; ``idx`` the bank's :class:`SparseIndex` for this layer shape; ``route`` a planned
    :class:`~randlora.planner.Route` (None: planned here, once).
    """

    @classmethod
    def apply(cls, x, W, bias, lam, gam, idx, s, route=None):  # type: ignore[override]
        return _SparseOp.apply(x, W, bias, lam, gam, idx, s, route if route is not None else _route_of(x, W, lam, gam))


def sparse_randlora_linear(x: torch.Tensor, W: torch.Tensor | None, bias: torch.Tensor | None, lam: torch.Tensor,
                           gam: torch.Tensor, idx: SparseIndex, s: float, route: Route | None = None) -> torch.Tensor:
    """The op on the sparse route: ``y = x (W + s·ΔW)ᵀ + b``, equal to ``ops.randlora_linear`` with the same bases.

    Args:
        x: input ``(..., I)`` in the compute dtype.
        W: frozen weight ``(O, I)``, or None for the adapter term alone (``O`` then follows ``ops``' rule).
        bias: ``(O,)`` or None.
        lam: ``λ`` ``(r, n)``.
        gam: ``γ`` ``(n, m)``.
        idx: ``bank.sparse_index(O, I)``.
        s: the scale ``alpha / r``.
        route: the call's planned :class:`~randlora.planner.Route` (None: planned here from the call).

    Returns:
        ``y`` of shape ``(..., O)`` in ``x``'s dtype.

    Raises:
        ConfigError: the shapes or device do not match ``idx``.
    """
    def run(x2: torch.Tensor) -> torch.Tensor:
        op = _SparseOp.forward if untracked(x2, W, bias, lam, gam) else _SparseOp.apply
        return op(x2, W, bias, lam, gam, idx, s, route if route is not None else _route_of(x2, W, lam, gam))

    return on_rows(run, x)
