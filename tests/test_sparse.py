"""The sparse route (``randlora.sparse``) against the float64 reference, the dense routes and gradcheck; its index
structures (one per bank and layer shape, rebuilt when the bank moves, never saved); its cost model."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import pickle
from unittest import mock

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import randlora
from randlora import costs, ops, planner
from randlora import sparse as sparse_mod
from randlora.bank import BasisBank
from randlora.errors import ConfigError
from randlora.planner import plan_call
from randlora.recipes import BankShape
from randlora.costs import padded_width, sparse_costs
from randlora.sparse import SparseIndex, grouped_terms, sparse_randlora_linear
from bench_loader import load_benchmark
from reference import reference_delta

S = 0.7


def ternary_views(O, I, r, density, seed=0, dtype=torch.float64, pad=3):
    """Random ternary ``A (r, m)`` and ``B_flat (M, n·r)`` as strided views of larger bank tensors, plus the
    bank tensors in the bank layout ``(r, m_g)``, ``(M_g, n_g, r)`` for the reference."""
    g = torch.Generator().manual_seed(seed)
    m, M = min(O, I), max(O, I)
    n = math.ceil(m / r)

    def tern(*shape):
        keep = torch.rand(*shape, generator=g) < density
        sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
        return (keep * sign).to(dtype) * (1.0 / math.sqrt(density))

    A_bank = tern(r, m + pad)
    B_bank = tern(M + pad, n + 1, r)
    A = A_bank[:, :m]
    B = B_bank.view(M + pad, (n + 1) * r)[:M, : n * r]
    return A, B, A_bank, B_bank


def leaves(O, I, r, T, *, seed=1, dtype=torch.float64, bias=True, with_W=True, x_grad=True):
    g = torch.Generator().manual_seed(seed)
    m = min(O, I)
    n = math.ceil(m / r)
    x = torch.randn(T, I, generator=g, dtype=dtype).requires_grad_(x_grad)
    W = (torch.randn(O, I, generator=g, dtype=dtype) / math.sqrt(I)).requires_grad_() if with_W else None
    b = torch.randn(O, generator=g, dtype=dtype).requires_grad_() if bias else None
    lam = torch.randn(r, n, generator=g, dtype=dtype).requires_grad_()
    gam = (torch.randn(n, m, generator=g, dtype=dtype) / math.sqrt(n)).requires_grad_()
    return x, W, b, lam, gam


def reference_forward(x, W, b, lam, gam, A_bank, B_bank, O, I):
    """``y = x (W + s·ΔW)ᵀ + b`` in float64 from tests/reference.py's explicit sum over the ``n`` bases."""
    D = reference_delta(lam, gam, A_bank, B_bank, O, I, S)
    Weff = D if W is None else W.double() + D
    y = x.double() @ Weff.t()
    return y if b is None else y + b.double()


def grads(y, ins, gy):
    live = [t for t in ins if t is not None and t.requires_grad]
    got = torch.autograd.grad(y, live, gy)
    it = iter(got)
    return [next(it) if (t is not None and t.requires_grad) else None for t in ins]


SHAPES = [(40, 24, 4), (24, 40, 4), (30, 30, 8), (6, 10, 8), (10, 6, 16), (33, 17, 5)]


# ------------------------------------------------------------------------------------------------
# numerics
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("O,I,r", SHAPES)
@pytest.mark.parametrize("T", [1, 9, 30, 70])
@pytest.mark.parametrize("variant", ["full", "no_bias", "W_none", "x_frozen"])
def test_forward_and_gradients_match_reference(O, I, r, T, variant):
    A, B, A_bank, B_bank = ternary_views(O, I, r, 0.3, seed=O * 100 + I)
    idx = SparseIndex(A, B, r)
    x, W, b, lam, gam = leaves(O, I, r, T, bias=variant not in ("no_bias", "W_none"), with_W=variant != "W_none",
                               x_grad=variant != "x_frozen")
    if W is not None and variant == "x_frozen":
        W.requires_grad_(False)
    y = sparse_randlora_linear(x, W, b, lam, gam, idx, S)
    # reference on detached copies, so that gradients come from the reference's own graph
    xr, Wr, br, lr, gr = (t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None
                          for t in (x, W, b, lam, gam))
    y_ref = reference_forward(xr, Wr, br, lr, gr, A_bank, B_bank, O, I)
    assert y.shape == y_ref.shape == (T, O)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn(T, O, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    got = grads(y, [x, W, b, lam, gam], gy)
    ref = grads(y_ref, [xr, Wr, br, lr, gr], gy)
    for name, a, e in zip(("x", "W", "b", "lam", "gam"), got, ref):
        assert (a is None) == (e is None), name
        if a is not None:
            torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11, msg=lambda m: f"∂{name}: {m}")


@pytest.mark.parametrize("O,I,r", [(12, 8, 3), (8, 12, 3), (9, 9, 4), (5, 7, 8)])
@pytest.mark.parametrize("with_W", [True, False])
def test_gradcheck(O, I, r, with_W):
    A, B, _, _ = ternary_views(O, I, r, 0.4, seed=3)
    idx = SparseIndex(A, B, r)
    x, W, b, lam, gam = leaves(O, I, r, 5, with_W=with_W, bias=with_W)
    if with_W:
        fn = lambda x, W, b, lam, gam: sparse_randlora_linear(x, W, b, lam, gam, idx, S)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, W, b, lam, gam))
    else:
        fn = lambda x, lam, gam: sparse_randlora_linear(x, None, None, lam, gam, idx, S)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, lam, gam))


@pytest.mark.parametrize("mode", ["sparse", "very_sparse"])
@pytest.mark.parametrize("O,I", [(96, 64), (64, 96), (80, 80)])
@pytest.mark.parametrize("T", [8, 80, 300])
@pytest.mark.parametrize("path", ["activation", "weight"])
def test_equals_dense_routes_fp32(mode, O, I, T, path):
    """The real bank's ternary bases; the sparse route equals ops.randlora_linear to 1e-5 relative (fp32)."""
    r = 8
    bank = BasisBank(seed=5, mode=mode, recipe="portable", shape=BankShape(r=r, M=max(O, I) + 7, m=min(O, I) + 4))
    A, B = bank.views(O, I)
    idx = bank.sparse_index(O, I)
    assert 0 < idx.density_A < (0.5 if mode == "sparse" else 0.2)
    x, W, b, lam, gam = leaves(O, I, r, T, dtype=torch.float32)
    gy = torch.randn(T, O, generator=torch.Generator().manual_seed(2))
    y = sparse_randlora_linear(x, W, b, lam, gam, idx, S)
    got = grads(y, [x, W, b, lam, gam], gy)
    xd, Wd, bd, ld, gd = (t.detach().clone().requires_grad_() for t in (x, W, b, lam, gam))
    y_dense = ops.randlora_linear(xd, Wd, bd, ld, gd, A, B, S, path)
    ref = grads(y_dense, [xd, Wd, bd, ld, gd], gy)

    def close(a, e, what):
        err = (a - e).norm() / e.norm()
        assert err <= 1e-5, f"{what}: relative error {err:.2e}"

    close(y, y_dense, "y")
    for name, a, e in zip(("x", "W", "b", "lam", "gam"), got, ref):
        close(a, e, "∂" + name)


@settings(max_examples=40, deadline=None)
@given(O=st.integers(1, 40), I=st.integers(1, 40), r=st.integers(1, 12), T=st.integers(1, 20),
       density=st.sampled_from([0.05, 0.2, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_property_any_shape(O, I, r, T, density, seed):
    A, B, A_bank, B_bank = ternary_views(O, I, r, density, seed=seed)
    idx = SparseIndex(A, B, r)
    x, W, b, lam, gam = leaves(O, I, r, T, seed=seed)
    y = sparse_randlora_linear(x, W, b, lam, gam, idx, S)
    xr, Wr, br, lr, gr = (t.detach().clone().requires_grad_() for t in (x, W, b, lam, gam))
    y_ref = reference_forward(xr, Wr, br, lr, gr, A_bank, B_bank, O, I)
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
    gy = torch.randn(T, O, dtype=torch.float64)
    for a, e in zip(grads(y, [x, W, b, lam, gam], gy), grads(y_ref, [xr, Wr, br, lr, gr], gy)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def small_blocks(monkeypatch) -> None:
    """CPU token blocks of 4 tokens (the planner's DEVICE_COSTS row), whatever the thread count."""
    cpu = dataclasses.replace(costs.DEVICE_COSTS["cpu"], token_block=4, token_block_threaded=4)
    monkeypatch.setitem(costs.DEVICE_COSTS, "cpu", cpu)


@pytest.mark.parametrize("O,I,r", [(40, 24, 4), (24, 40, 4)])
@pytest.mark.parametrize("T", [8, 13])
@pytest.mark.parametrize("with_W", [True, False])
def test_token_blocks(monkeypatch, O, I, r, T, with_W):
    """Many CPU token blocks, with and without a partial last block, against the reference (and the
    per-thread scratch buffers reused across calls of other shapes in between)."""
    small_blocks(monkeypatch)
    A, B, A_bank, B_bank = ternary_views(O, I, r, 0.3, seed=11)
    idx = SparseIndex(A, B, r)
    for rep in range(2):
        x, W, b, lam, gam = leaves(O, I, r, T, seed=rep, with_W=with_W, bias=with_W)
        y = sparse_randlora_linear(x, W, b, lam, gam, idx, S)
        ins = [x, W, b, lam, gam]
        refs = [t.detach().clone().requires_grad_() if t is not None else None for t in ins]
        y_ref = reference_forward(*refs, A_bank, B_bank, O, I)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        gy = torch.randn(T, O, dtype=torch.float64)
        for a, e in zip(grads(y, ins, gy), grads(y_ref, refs, gy)):
            if a is not None:
                torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)
        # another shape through the same scratch buffers in between
        A2, B2, _, _ = ternary_views(I + 9, O + 3, r, 0.5, seed=rep)
        x2, W2, b2, l2, g2 = leaves(I + 9, O + 3, r, 2 * T + 1, seed=rep)
        sparse_randlora_linear(x2, W2, b2, l2, g2, SparseIndex(A2, B2, r), S).sum().backward()


@pytest.mark.parametrize("O,I", [(40, 24), (24, 40)])
def test_non_contiguous_input_and_gradient(monkeypatch, O, I):
    """A transposed-view input and an expanded output gradient (``y.sum()``), over several token blocks."""
    small_blocks(monkeypatch)
    r, T = 4, 10
    A, B, A_bank, B_bank = ternary_views(O, I, r, 0.3, seed=5)
    idx = SparseIndex(A, B, r)
    _, W, b, lam, gam = leaves(O, I, r, T)
    x = torch.randn(I, T, dtype=torch.float64).t().requires_grad_()
    assert not x.is_contiguous()
    y = sparse_randlora_linear(x, W, b, lam, gam, idx, S)
    y.sum().backward()
    refs = [t.detach().clone().requires_grad_() for t in (x, W, b, lam, gam)]
    y_ref = reference_forward(*refs, A_bank, B_bank, O, I)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, e in zip((x, W, b, lam, gam), refs):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-11, atol=1e-11)


@settings(max_examples=40, deadline=None)
@given(O=st.integers(1, 40), I=st.integers(1, 40), r=st.integers(1, 12), T=st.integers(1, 20),
       G=st.integers(1, 4), density=st.sampled_from([0.05, 0.2, 1.0]), seed=st.integers(0, 2**16),
       side=st.sampled_from([None, True, False]), block=st.sampled_from([None, 1, 3, 7]), data=st.data())
def test_grouped_terms_equal_each_adapter_on_its_tokens(O, I, r, T, G, density, seed, side, block, data):
    """The serving pass: several adapters at once, each on its own tokens (others 0), equal to the float64
    reference ``x_g ΔW_gᵀ`` per group, whichever way each group's S product goes (``side``: forced, or the
    rule's choice) and in windows of any ``block`` of tokens (a window may cut through groups)."""
    A, B, A_bank, B_bank = ternary_views(O, I, r, density, seed=seed)
    idx = SparseIndex(A, B, r)
    x = leaves(O, I, r, T, seed=seed)[0].detach()
    owner = data.draw(st.lists(st.integers(-1, G - 1), min_size=T, max_size=T))  # -1: no adapter
    groups, want = [], torch.zeros(T, O, dtype=torch.float64)
    for g in range(G):
        _, _, _, lam, gam = leaves(O, I, r, 1, seed=seed + 7 * g + 1)
        lam, gam, s = lam.detach(), gam.detach(), 0.5 + g
        tok = torch.tensor([t for t in range(T) if owner[t] == g], dtype=torch.long)
        if tok.numel() == 0:
            continue
        groups.append((lam, gam, s, tok[torch.randperm(tok.numel())]))  # any order within a group
        D = reference_delta(lam, gam, A_bank, B_bank, O, I, s)
        want[tok] = x[tok] @ D.t()
    assume(groups)  # (a mixed block calls it with at least one adapter)
    below = {True: math.inf, False: 0.0, None: 1.5 * idx.nnz_A / idx.m}[side]  # (None: the CPU's plan)
    y = grouped_terms(x, idx, O, groups, block, below)
    assert y.shape == (T, O) and y.dtype == x.dtype
    torch.testing.assert_close(y, want, rtol=1e-11, atol=1e-11)


def test_all_zero_bases_give_the_frozen_layer():
    """A slice of ternary bases may hold no non-zero at all: the update is then exactly zero."""
    O, I, r = 6, 4, 2
    A = torch.zeros(r, 4, dtype=torch.float64)
    B = torch.zeros(6, 2 * r, dtype=torch.float64)
    idx = SparseIndex(A, B, r)
    x, W, b, lam, gam = leaves(O, I, r, 3)
    y = sparse_randlora_linear(x, W, b, lam, gam, idx, S)
    torch.testing.assert_close(y, x @ W.t() + b, rtol=0, atol=0)
    y.sum().backward()
    assert torch.count_nonzero(lam.grad) == 0 and torch.count_nonzero(gam.grad) == 0


def test_bf16_compute_matches_dense_route_error():
    """bf16 activations (CPU CSR products run in float32): error against float64 no worse than the dense route's."""
    O, I, r, T = 64, 96, 8, 40
    bank = BasisBank(seed=1, mode="very_sparse", recipe="portable", shape=BankShape(r=r, M=96, m=64))
    A, B = bank.views(O, I)
    idx = bank.sparse_index(O, I)
    x, W, b, lam, gam = leaves(O, I, r, T, dtype=torch.float32, x_grad=False)
    xb, Wb = x.to(torch.bfloat16), W.detach().to(torch.bfloat16)
    y = sparse_randlora_linear(xb, Wb, None, lam, gam, idx, S)
    yd = ops.randlora_linear(xb, Wb, None, lam, gam, A, B, S, "activation")
    assert y.dtype == torch.bfloat16
    ref = reference_forward(xb.double(), Wb.double(), None, lam.detach(), gam.detach(), bank.A, bank.B, O, I)
    err = (y.double() - ref).norm() / ref.norm()
    err_dense = (yd.double() - ref).norm() / ref.norm()
    assert err <= 2 * err_dense + 1e-3, (err, err_dense)
    y.float().sum().backward()
    assert lam.grad.dtype == torch.float32 and torch.isfinite(lam.grad).all()


def test_backward_saves_no_token_by_rank_tensor():
    """Backward keeps x, W, λ, γ only: nothing of size T × n·r (and no copy of the bases)."""
    O, I, r, T = 48, 96, 4, 64
    A, B, _, _ = ternary_views(O, I, r, 0.3)
    idx = SparseIndex(A, B, r)
    x, W, b, lam, gam = leaves(O, I, r, T, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        sparse_randlora_linear(x, W, b, lam, gam, idx, S)
    assert sorted(saved) == sorted([tuple(x.shape), tuple(W.shape), tuple(lam.shape), tuple(gam.shape)])


def test_mismatched_index_is_refused():
    A, B, _, _ = ternary_views(24, 40, 4, 0.3)
    idx = SparseIndex(A, B, 4)
    x, W, b, lam, gam = leaves(30, 40, 4, 3)
    with pytest.raises(ConfigError, match="sparse_index"):
        sparse_randlora_linear(x, W, b, lam, gam, idx, S)
    x, W, b, lam, gam = leaves(24, 40, 2, 3)
    with pytest.raises(ConfigError, match="do not fit"):
        sparse_randlora_linear(x, W, b, lam, gam, idx, S)
    with pytest.raises(ConfigError, match="input width"):
        sparse_randlora_linear(torch.randn(3, 7, dtype=torch.float64), None, None, lam, gam, idx, S)
    with pytest.raises(ConfigError, match="r=5"):
        SparseIndex(A, B, 5)
    dense = BasisBank(seed=0, mode="dense", recipe="portable", shape=BankShape(r=4, M=40, m=24))
    with pytest.raises(ConfigError, match="bases='sparse' or bases='very_sparse'"):
        dense.sparse_index(24, 40)
    assert dense.sparse_indexes == 0


# ------------------------------------------------------------------------------------------------
# index structures: one per bank and shape, moved with the bank, never saved
# ------------------------------------------------------------------------------------------------
class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 48)
        self.b = nn.Linear(32, 48)
        self.c = nn.Linear(48, 32)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


def sparse_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = Two().to(dtype)
    randlora.inject(model, ["a", "b", "c"], r=4, bases="very_sparse")
    with torch.no_grad():
        for layer in (model.a, model.b, model.c):
            layer.randlora_lambda.normal_()
    return model


def layer_output(layer, x):
    idx = layer.bank.sparse_index(layer.out_features, layer.in_features)
    return sparse_randlora_linear(x, layer.weight, layer.bias, layer.randlora_lambda, layer.randlora_gamma, idx,
                                  layer.scaling)


def test_one_index_per_bank_and_shape():
    model = sparse_model()
    bank = model.a.bank
    assert model.b.bank is bank and model.c.bank is bank
    ia = bank.sparse_index(48, 32)
    assert bank.sparse_index(48, 32) is ia  # memoised
    assert model.b.bank.sparse_index(48, 32) is ia  # shared by the layers of that shape
    ic = bank.sparse_index(32, 48)
    assert ic is ia  # (O, I) and (I, O) use the same views
    assert isinstance(ia, SparseIndex) and (ia.M, ia.m, ia.r) == (48, 32, 4)
    assert bank.sparse_indexes == 1
    x = torch.randn(5, 32)
    for layer in (model.a, model.b):
        torch.testing.assert_close(layer_output(layer, x), layer(x), rtol=1e-5, atol=1e-6)


def test_index_rebuilt_after_dtype_change_and_regenerate():
    model = sparse_model()
    bank = model.a.bank
    i32 = bank.sparse_index(48, 32)
    model.to(torch.float64)
    i64 = bank.sparse_index(48, 32)
    assert i64 is not i32 and i64.dtype == torch.float64 and i64.vals.dtype == torch.float64
    assert i64.b_val.dtype == torch.float64 and i64.s_a.dtype == torch.float64
    x = torch.randn(5, 32, dtype=torch.float64)
    expected = model.a(x)
    torch.testing.assert_close(layer_output(model.a, x), expected, rtol=1e-12, atol=1e-12)
    bank.regenerate_()
    assert bank.sparse_index(48, 32) is not i64
    # an in-place write to the bases (not through the library) is seen by the version check
    i_before = bank.sparse_index(48, 32)
    with torch.no_grad():
        bank.A.mul_(1.0)
    assert bank.sparse_index(48, 32) is not i_before


def test_nothing_sparse_is_saved_and_copies_work():
    model = sparse_model()
    before_sd = set(model.state_dict())
    before_rl = {k: v.clone() for k, v in randlora.state_dict(model).items()}
    model.a.bank.sparse_index(48, 32)
    assert set(model.state_dict()) == before_sd
    after = randlora.state_dict(model)
    assert set(after) == set(before_rl)
    for k, v in after.items():
        assert v.layout == torch.strided, k
        torch.testing.assert_close(v, before_rl[k], rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(after, buf)
    # copies of the model (deepcopy, pickle) start with an empty memo and rebuild it
    clone = copy.deepcopy(model)
    assert clone.a.bank.sparse_indexes == 0
    assert clone.a.bank.sparse_index(48, 32) is not model.a.bank.sparse_index(48, 32)
    again = pickle.loads(pickle.dumps(model))
    assert again.a.bank.sparse_indexes == 0
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer_output(clone.a, x), layer_output(model.a, x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# cost model
# ------------------------------------------------------------------------------------------------
def test_costs_scale_with_density_and_route_choice():
    T, O, I, nr = 1024, 1024, 1024, 1024
    lo = sparse_costs(T, O, I, nr, 1 / 32, 1 / 32, weighted=False)
    hi = sparse_costs(T, O, I, nr, 1 / 3, 1 / 3, weighted=False)
    assert lo["total"] < hi["total"] < 5 * T * nr * 1024  # both below the dense activation route's 5·T·nr·d
    # I <= O: backward shares gy B_flat; O < I recomputes x B_flat for ∂S: one more B product
    tr = sparse_costs(T, 512, 1024, 512, 0.05, 0.05, weighted=False)
    nt = sparse_costs(T, 1024, 512, 512, 0.05, 0.05, weighted=False)
    assert tr["backward"] - nt["backward"] == pytest.approx(T * 1024 * 512 * 0.05)
    assert sparse_costs(T, O, I, nr, 0.1, 0.1, need_x=False, need_S=False)["backward"] == 0
    assert sparse_costs(T, O, I, nr, 0.1, 0.1, need_W=True)["backward"] > sparse_costs(T, O, I, nr, 0.1, 0.1)[
        "backward"]
    assert padded_width(1024, 1 / 32) > 32 and padded_width(10, 1.0) == 10
    # very sparse bases pay at width 1024; dense "ternary" (density 1) never does
    assert plan_call(T=1024, O=1024, I=1024, nr=1024, r=32, density=1 / 32).kind == "sparse"
    assert plan_call(T=1024, O=2816, I=1024, nr=1024, r=32, density=1 / 32).kind == "sparse"
    for T_ in (64, 1024, 8192):
        for O_, I_ in ((1024, 1024), (2816, 1024), (1024, 2816)):
            assert plan_call(T=T_, O=O_, I=I_, nr=1024, r=32, density=1.0).kind == "dense"


@pytest.mark.parametrize("need_x,need_S", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("O,I", [(1024, 512), (512, 1024)])
def test_costs_count_the_token_block_copies(O, I, need_x, need_S):
    """Weighted, each call pays ``layout_weight`` per element copied to or from token blocks: forward the input
    and the output; backward ``gy`` and ``∂x`` for ∂x, and ``gy`` (I <= O) or ``x`` (O < I) for ∂S alone."""
    T, nr, d = 300, 512, 1 / 32
    cpu = costs.DEVICE_COSTS["cpu"]
    one = sparse_costs(T, O, I, nr, d, d, need_x=need_x, need_S=need_S, threads=1)
    two = sparse_costs(T, O, I, nr, d, d, need_x=need_x, need_S=need_S, threads=2)
    per = cpu.layout_weight_threaded - cpu.layout_weight
    assert two["forward"] - one["forward"] == pytest.approx(per * T * (I + O))
    copied = (T * (O + I) if need_x else 0) + (T * (I if O < I else (0 if need_x else O)) if need_S else 0)
    assert two["backward"] - one["backward"] == pytest.approx(per * copied)


def test_copies_move_narrow_layers_off_the_sparse_route():
    """At all-MiniLM-L6-v2's widths the token-block copies outweigh the sparse products' savings, and a no-grad
    call of 512 tokens builds W + s·ΔW through the bases' non-zeros (measured faster: docs/sparse.md); at the
    benchmark Llama's widths a decode step of 64 rows and a prefill of 512 tokens stay on the sparse route, and
    2,048 tokens of 2816×1024 build W + s·ΔW. A 256-token training step at MiniLM's widths cannot keep its
    ``W + s·ΔW`` (larger than its input) and stays on the sparse route."""
    def route(T, O, I, grad=False):
        return plan_call(T=T, O=O, I=I, nr=min(O, I), r=32, grad=grad, density=1 / math.sqrt(min(O, I)), threads=2)
    for O, I in ((384, 384), (1536, 384)):
        assert (route(512, O, I).forward, route(512, O, I).build) == ("kept", "nonzeros")
        assert route(256, O, I, grad=True).kind == "sparse"
    assert route(64, 2816, 1024).kind == route(64, 1024, 2816).kind == route(512, 2816, 1024).kind == "sparse"
    assert route(2048, 2816, 1024).build == "nonzeros"


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_and_dense_route(dtype):
    model = sparse_model()
    layers = (model.a, model.c)  # I <= O and O < I
    inputs = [torch.randn(70, layer.in_features) for layer in layers]
    cpu = [layer_output(layer, x).detach() for layer, x in zip(layers, inputs)]
    model.cuda()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for layer, x, ref in zip(layers, inputs, cpu):
        O, I = layer.out_features, layer.in_features
        idx = layer.bank.sparse_index(O, I)
        assert idx.device.type == "cuda" and idx.b_val.device.type == "cuda" and idx.t_perm.device.type == "cuda"
        A, B = layer.bank.views(O, I)
        W, b = layer.weight.detach().to(dtype), layer.bias.detach().to(dtype)
        lam, gam = layer.randlora_lambda, layer.randlora_gamma
        xs = x.cuda().to(dtype).requires_grad_()
        xd = xs.detach().clone().requires_grad_()
        y = sparse_randlora_linear(xs, W, b, lam, gam, idx, layer.scaling)
        yd = ops.randlora_linear(xd, W, b, lam, gam, A, B, layer.scaling, "activation")
        assert y.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-5)
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, (xs, lam, gam), gy)
        exp = torch.autograd.grad(yd, (xd, lam, gam), gy)
        for a, e in zip((y, *got), (yd, *exp)):
            err = ((a.float() - e.float()).norm() / e.float().norm()).item()
            assert err <= tol, err


# ------------------------------------------------------------------------------------------------
# the one-layer benchmark runs (smoke)
# ------------------------------------------------------------------------------------------------
def test_sparse_op_benchmark_quick(tmp_path, capsys):
    import json

    mod = load_benchmark("sparse_op")
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "sparse_op.json"
        mod.main(["--quick", "--out", str(out)])
        data = json.loads(out.read_text())
        assert len(data["rows"]) == 8  # 2 shapes × 2 token counts × 2 modes
        for row in data["rows"]:
            assert set(row["median"]) == {"activation", "weight", "sparse", "frozen", "lora"}
            assert all(t > 0 for t in row["median"].values())
            assert 0 < row["floors"]["sparse_raw"] < row["floors"]["sparse"]
        assert "| O×I |" in capsys.readouterr().out
        mod.main(["--quick", "--kernels", "--modes", "very_sparse"])
        assert "sampled ∂S / GEMM" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
