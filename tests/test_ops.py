"""The fused op against a float64 reference built from the definition, route by route.

Reference: ``ΔW = s · Σ_i B_i diag(λ_i) A diag(γ_i)`` with ``B_i`` = columns ``i, n+i, …, (r-1)n+i`` of
the flattened bank view (transposed when ``O < I``); ``y = x (W + ΔW)ᵀ + b``; gradients by autograd on
that float64 expression.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import randlora
from randlora import ops, planner
from randlora.costs import backward_costs, forward_costs
from randlora.ops import RandLoraFunction
from randlora.planner import plan, plan_call

FWD = ("weight", "activation")
BWD = [("fused", "G"), ("fused", "act"), ("act", "G"), ("act", "act")]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def make(O, I, r, T, *, dtype=torch.float64, bias=True, seed=0, pad=3):
    """Random op inputs; ``A``/``B`` are strided views of larger 'bank' tensors, like the real bank's."""
    g = torch.Generator().manual_seed(seed)
    m, M = min(O, I), max(O, I)
    n = math.ceil(m / r)
    A_bank = torch.randn(r, m + pad, generator=g, dtype=dtype)
    B_bank = torch.randn(M + pad, (n + 1) * r, generator=g, dtype=dtype)
    A, B = A_bank[:, :m], B_bank[:M, : n * r]
    x = torch.randn(T, I, generator=g, dtype=dtype)
    W = torch.randn(O, I, generator=g, dtype=dtype) / math.sqrt(I)
    b = torch.randn(O, generator=g, dtype=dtype) if bias else None
    lam = torch.randn(r, n, generator=g, dtype=dtype)
    gam = torch.randn(n, m, generator=g, dtype=dtype) / math.sqrt(n)
    s = 0.7
    return dict(x=x, W=W, b=b, lam=lam, gam=gam, A=A, B=B, s=s, A_bank=A_bank, B_bank=B_bank)


def ref_delta(lam, gam, A, B, s, O, I):
    """``s · Σ_i B_i diag(λ_i) A diag(γ_i)`` in float64, straight from the definition."""
    r, n = lam.shape
    P = 0
    for i in range(n):
        Bi = B.double()[:, i::n]  # columns i, n+i, ..., (r-1)n+i
        P = P + Bi @ torch.diag(lam[:, i].double()) @ A.double() @ torch.diag(gam[i].double())
    P = s * P
    return P if I <= O else P.t()


def ref_forward(x, W, b, lam, gam, A, B, s):
    T, I = x.shape
    O = W.shape[0] if W is not None else None
    if O is None:
        m, M = A.shape[1], B.shape[0]
        O = M if I == m and M != m else m
    Weff = ref_delta(lam, gam, A, B, s, O, I)
    if W is not None:
        Weff = W.double() + Weff
    y = x.double() @ Weff.t()
    return y if b is None else y + b.double()


def forced(fwd=None, bwd=None):
    """``RandLoraFunction.apply`` on a route with the given forward and backward (the planner's route for the call,
    ``planner.op_route``, with those replaced): the op runs whatever route it is handed."""
    def apply(x, W, b, lam, gam, A, B, s, path="auto", prebuilt=None):
        T, I = x.shape
        O = W.shape[0] if W is not None else ops.out_features(I, A.shape[1], B.shape[0])
        grad = torch.is_grad_enabled()
        need_x, need_S = grad and x.requires_grad, grad and (lam.requires_grad or gam.requires_grad)
        r = planner.op_route(T, O, I, lam.numel(), with_weight=W is not None, need_x=need_x, need_S=need_S,
                             need_W=grad and W is not None and W.requires_grad, kept=prebuilt is not None)
        change = {}
        if fwd is not None and r.forward != "kept":  # a prebuilt W + s·ΔW is always used
            change["forward"] = fwd
        if bwd is not None:
            change["grad_x"] = bwd[0] if need_x else None
            change["grad_S"] = bwd[1] if need_S else None
        return RandLoraFunction.apply(x, W, b, lam, gam, A, B, s, dataclasses.replace(r, **change), prebuilt)

    return apply


def check_routes(O, I, r, T, *, bias=True, with_W=True, need_x=True, need_W=False, fwd="weight",
                 bwd=("fused", "G"), kept=False, seed=0):
    d = make(O, I, r, T, bias=bias, seed=seed)
    x = d["x"].requires_grad_(need_x)
    W = d["W"].requires_grad_(need_W) if with_W else None
    b = d["b"]
    lam, gam = d["lam"].requires_grad_(), d["gam"].requires_grad_()
    prebuilt = None
    if kept:
        prebuilt = ops.build_weight(W, lam, gam, d["A"], d["B"], d["s"], O < I, torch.float64)
    y = forced(fwd, bwd)(x, W, b, lam, gam, d["A"], d["B"], d["s"], "auto", prebuilt)
    gy = torch.randn_like(y)
    leaves = [x, lam, gam] + ([W] if with_W else [])
    got = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], gy)
    y_ref = ref_forward(x, W, b, lam, gam, d["A"], d["B"], d["s"])
    want = torch.autograd.grad(y_ref, [t for t in leaves if t.requires_grad], gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# routes against the reference
# ------------------------------------------------------------------------------------------------
SHAPES = [(12, 12, 4), (20, 8, 3), (8, 20, 3), (9, 9, 16), (1, 7, 2), (7, 1, 2)]


@pytest.mark.parametrize("O,I,r", SHAPES)
@pytest.mark.parametrize("fwd", FWD)
@pytest.mark.parametrize("bwd", BWD)
def test_every_route_matches_reference(O, I, r, fwd, bwd):
    check_routes(O, I, r, T=11, fwd=fwd, bwd=bwd)


@pytest.mark.parametrize("O,I,r", SHAPES)
@pytest.mark.parametrize("sr", ["G", "act"])
def test_kept_weight_route_matches_reference(O, I, r, sr):
    check_routes(O, I, r, T=11, kept=True, bwd=("kept", sr))


@pytest.mark.parametrize("fwd", FWD)
@pytest.mark.parametrize("bwd", BWD)
def test_delta_only_no_bias_and_no_input_grad(fwd, bwd):
    check_routes(16, 10, 3, T=9, with_W=False, bias=False, fwd=fwd, bwd=bwd)
    check_routes(10, 16, 3, T=9, with_W=False, bias=False, fwd=fwd, bwd=bwd)
    check_routes(16, 10, 3, T=9, need_x=False, fwd=fwd, bwd=bwd)
    check_routes(10, 16, 3, T=9, need_x=False, bias=False, fwd=fwd, bwd=bwd)


@pytest.mark.parametrize("bwd", BWD + [("kept", "G")])
def test_weight_gradient_when_weight_trains(bwd):
    kept = bwd[0] == "kept"
    check_routes(14, 9, 4, T=7, need_W=True, fwd="weight", bwd=bwd, kept=kept)
    check_routes(9, 14, 4, T=7, need_W=True, fwd="activation" if not kept else None, bwd=bwd, kept=kept)


@settings(max_examples=20, deadline=None)
@given(O=st.integers(1, 24), I=st.integers(1, 24), r=st.integers(1, 9), T=st.integers(1, 40),
       route=st.sampled_from([(f, b) for f in FWD for b in BWD]), auto=st.booleans(), seed=st.integers(0, 99))
def test_hypothesis_shapes(O, I, r, T, route, auto, seed):
    fwd, bwd = (None, None) if auto else route
    check_routes(O, I, r, T, fwd=fwd, bwd=bwd, seed=seed)


@pytest.mark.parametrize("fwd", FWD)
@pytest.mark.parametrize("bwd", BWD)
@pytest.mark.parametrize("O,I", [(6, 4), (4, 6)])
def test_gradcheck(fwd, bwd, O, I):
    d = make(O, I, 2, 5)
    x = d["x"].requires_grad_()
    W = d["W"].requires_grad_()
    b = d["b"].requires_grad_()
    lam, gam = d["lam"].requires_grad_(), d["gam"].requires_grad_()
    apply = forced(fwd, bwd)
    assert torch.autograd.gradcheck(lambda *t: apply(*t, d["A"], d["B"], d["s"], "auto"), (x, W, b, lam, gam))
    assert torch.autograd.gradcheck(lambda *t: apply(t[0], None, None, *t[1:], d["A"], d["B"], d["s"], "auto"),
                                    (x, lam, gam))


def test_gradcheck_kept():
    d = make(5, 7, 2, 4)
    x = d["x"].requires_grad_()
    lam, gam = d["lam"].requires_grad_(), d["gam"].requires_grad_()

    def f(x, lam, gam):  # the kept update is built from the (perturbed) parameters, as the layer does
        prebuilt = ops.build_weight(d["W"], lam, gam, d["A"], d["B"], d["s"], True, torch.float64)
        return RandLoraFunction.apply(x, d["W"], d["b"], lam, gam, d["A"], d["B"], d["s"], "auto", prebuilt)

    assert torch.autograd.gradcheck(f, (x, lam, gam))


@pytest.mark.parametrize("path", ["weight", "activation"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_its_dtype(path, dtype):
    d = make(24, 16, 4, 32, dtype=torch.float32)
    x, W = d["x"].to(dtype).requires_grad_(), d["W"].to(dtype)
    lam, gam = d["lam"].requires_grad_(), d["gam"].requires_grad_()
    y = randlora.randlora_linear(x, W, None, lam, gam, d["A"], d["B"], d["s"], path)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    assert lam.grad.dtype == torch.float32 and gam.grad.dtype == torch.float32 and x.grad.dtype == dtype
    y_ref = ref_forward(x.detach(), W, None, lam.detach(), gam.detach(), d["A"], d["B"], d["s"])
    torch.testing.assert_close(y.double(), y_ref, rtol=3e-2, atol=3e-2 * y_ref.abs().max().item())
    lr, gr = lam.detach().double().requires_grad_(), gam.detach().double().requires_grad_()
    ref_forward(x.detach(), W, None, lr, gr, d["A"], d["B"], d["s"]).square().sum().backward()
    for got, want in ((lam.grad, lr.grad), (gam.grad, gr.grad)):
        assert (got.double() - want).norm() <= 3e-2 * want.norm()


# ------------------------------------------------------------------------------------------------
# cost model
# ------------------------------------------------------------------------------------------------
def test_cost_model_choices():
    d, nr = 1024, 1024
    assert plan(64, d, d, nr)["forward"] == "activation"
    assert plan(8192, d, d, nr)["forward"] == "weight"
    assert plan(64, d, d, nr)["backward"] == ("act", "act")
    assert plan(8192, d, d, nr)["backward"] == ("fused", "G")
    assert plan(8192, d, d, nr, kept=True)["backward"] == ("kept", "G")
    assert plan(8192, d, d, nr, path="activation")["forward"] == "activation"
    assert plan(64, d, d, nr, path="weight")["backward"][1] == "G"
    # keeping W + s·ΔW: pays at large T, refused when it would outweigh the saved input
    def kept(T, **kw):
        return plan_call(T=T, O=d, I=d, nr=nr, r=32, **kw).build is not None

    assert kept(8192) and not kept(64)
    assert not kept(8192, keep="never") and kept(64, keep="always")
    assert not kept(8192, path="activation")
    assert not kept(8192, need_x=False)  # nothing to save on ∂x


@pytest.mark.parametrize("O,I,r,T", [(48, 32, 4, 20), (32, 48, 4, 20)])
@pytest.mark.parametrize("route", [(f, b) for f in FWD for b in BWD])
def test_cost_model_counts_the_multiply_adds(O, I, r, T, route):
    """Counted matmul work of the op minus the frozen layer's equals the model's prediction."""
    d = make(O, I, r, T)
    x, W = d["x"].requires_grad_(), d["W"]
    lam, gam = d["lam"].requires_grad_(), d["gam"].requires_grad_()
    fwd, bwd = route
    def addmm_(self_shape, a, b, out_shape=None, **kw):  # the op accumulates into y in place
        return 2 * a[0] * a[1] * b[1]

    inplace = {torch.ops.aten.addmm_: addmm_}
    with FlopCounterMode(display=False, custom_mapping=inplace) as fc:
        y = forced(fwd, bwd)(x, W, None, lam, gam, d["A"], d["B"], d["s"], "auto")
        y.backward(torch.ones_like(y))
    n = lam.shape[1]
    nr, m = n * r, min(O, I)
    tr = O < I
    pred = 2 * T * O * I + forward_costs(T, O, I, nr, True)[fwd] \
        + backward_costs(T, O, I, nr, tr, True, True, True, False)[bwd] + 2 * nr * m  # + the two reductions
    assert fc.get_total_flops() == 2 * pred


# ------------------------------------------------------------------------------------------------
# memory: what backward keeps
# ------------------------------------------------------------------------------------------------
def _saved(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("path", ["auto", "weight", "activation"])
@pytest.mark.parametrize("O,I", [(40, 24), (24, 40)])
def test_backward_keeps_no_token_by_rank_tensor_and_no_bases_copy(path, O, I):
    T, r = 64, 5
    bank_model = nn.Sequential(nn.Linear(I, O))
    randlora.inject(bank_model, targets=["0"], r=r)
    layer = bank_model[0]
    layer.set_keep("never")
    with torch.no_grad():
        layer.randlora_lambda.normal_()
    layer.set_path(path)
    x = torch.randn(T, I, requires_grad=True)
    _, saved = _saved(lambda: layer(x))
    nr = layer.n * r
    bank = bank_model.randlora_bank
    shared = {bank.A.untyped_storage().data_ptr(), bank.B.untyped_storage().data_ptr()}
    for t in saved:
        if t is x or t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            continue
        assert t.numel() < T * nr, f"saved a {tuple(t.shape)} tensor"
        if t.numel() >= r * layer.m:  # anything bases-sized must be the bank itself
            own = {p.untyped_storage().data_ptr() for p in (layer.weight, layer.randlora_lambda, layer.randlora_gamma)}
            assert t.untyped_storage().data_ptr() in shared | own


def test_kept_weight_is_the_only_extra_saved_tensor():
    layer_model = nn.Sequential(nn.Linear(24, 40))
    randlora.inject(layer_model, targets=["0"], r=4)
    layer = layer_model[0]
    layer.set_keep("always")
    with torch.no_grad():
        layer.randlora_lambda.normal_(0, 1e-2)
    x = torch.randn(64, 24, requires_grad=True)
    _, saved = _saved(lambda: layer(x))
    big = [t for t in saved if t.numel() >= 40 * 24 and t.untyped_storage().data_ptr() not in
           {x.untyped_storage().data_ptr(), layer.weight.untyped_storage().data_ptr(),
            layer_model.randlora_bank.B.untyped_storage().data_ptr()}]
    assert len(big) == 1 and tuple(big[0].shape) == (40, 24)
    A, B = layer.views()
    want = layer.weight.double() + ref_delta(layer.randlora_lambda, layer.randlora_gamma, A, B, layer.scaling, 40, 24)
    torch.testing.assert_close(big[0].double(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the layer: keep / reuse across micro-batches, and the eval cache
# ------------------------------------------------------------------------------------------------
def _model(O=40, I=24, r=4, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(I, O), nn.Tanh(), nn.Linear(O, I))
    randlora.inject(model, targets=["0", "2"], r=r)
    with torch.no_grad():
        for _, layer in _layers(model):
            layer.randlora_lambda.normal_(0, 1e-3)  # s = alpha/r = 160: keep s·ΔW comparable to W
            layer.randlora_gamma.uniform_(0.5, 1.5)
    return model


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, randlora.RandLoraLinear)]


def _ref_model_out(model, x):
    h = x.double()
    for mod in model:
        if isinstance(mod, randlora.RandLoraLinear):
            A, B = mod.views()
            W = mod.weight.double() + ref_delta(mod.randlora_lambda, mod.randlora_gamma, A, B, mod.scaling,
                                                mod.out_features, mod.in_features)
            h = h @ W.t() + mod.bias.double()
        else:
            h = mod(h)
    return h


@pytest.mark.parametrize("keep", ["always", "never", "auto"])
def test_keep_policies_give_the_same_gradients(keep):
    model = _model()
    for _, layer in _layers(model):
        layer.set_keep(keep)
    x = torch.randn(64, 24, requires_grad=True)
    y = model(x)
    y.square().sum().backward()
    ref = _model()
    xr = x.detach().double().requires_grad_()
    lams = [layer.randlora_lambda for _, layer in _layers(ref)]
    _ref_model_out(ref, xr).square().sum().backward()
    torch.testing.assert_close(y.double(), _ref_model_out(ref, x.detach()).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    for (_, layer), lr in zip(_layers(model), lams):
        torch.testing.assert_close(layer.randlora_lambda.grad.double(), lr.grad.double(), rtol=1e-4, atol=1e-4)


def test_cached_micro_batches_share_one_build_until_the_values_change():
    model = _model()
    layer = _layers(model)[0][1]
    layer.set_keep("always")
    opt = torch.optim.AdamW(randlora.trainable_parameters(model), lr=1e-3, fused=True)
    xs = [torch.randn(8, 24) for _ in range(3)]
    with randlora.cached(model) as names:
        assert names == ["0", "2"]
        cache = layer.cache
        for x in xs:  # three micro-batches: one build
            model(x).sum().backward()
        assert cache.builds == 1
        got = layer.randlora_gamma.grad.clone()
        opt.step()  # fused AdamW: no version counter moves, the values do
        model(xs[0]).sum().backward()
        assert cache.builds == 2
    assert layer.cache is None  # freed on exit
    ref = _model()
    for x in xs:
        _ref_model_out(ref, x).sum().backward()
    torch.testing.assert_close(got.double(), _layers(ref)[0][1].randlora_gamma.grad.double(), rtol=1e-4, atol=1e-4)


def test_cache_follows_values_not_versions():
    """Inside ``cached``: hits while λ/γ are unchanged; ``.data`` writes, in-place ops and weight swaps are
    all seen; hits and misses give bit-identical outputs; outside, nothing is kept."""
    model = _model()
    model.eval()
    layer = _layers(model)[0][1]
    x = torch.randn(16, 24)
    with torch.no_grad():
        y0 = model(x)
        assert layer.cache is None
        torch.testing.assert_close(y0.double(), _ref_model_out(model, x), rtol=1e-5, atol=1e-5)
        with randlora.cached(model):
            cache = layer.cache
            y1, y2 = model(x), model(x)
            assert cache.builds == 1 and torch.equal(y1, y2)
            torch.testing.assert_close(y1.double(), _ref_model_out(model, x), rtol=1e-5, atol=1e-5)
            layer.randlora_gamma.data.mul_(1.5)  # no version bump
            y3 = model(x)
            assert cache.builds == 2
            torch.testing.assert_close(y3.double(), _ref_model_out(model, x), rtol=1e-5, atol=1e-5)
            layer.randlora_lambda.add_(0.25)
            torch.testing.assert_close(model(x).double(), _ref_model_out(model, x), rtol=1e-5, atol=1e-5)
            assert cache.builds == 3
            layer.weight.data = layer.weight.data * 0.5  # storage swap of the frozen weight: W is never cached
            y5 = model(x)
            assert cache.builds == 3
            torch.testing.assert_close(y5.double(), _ref_model_out(model, x), rtol=1e-5, atol=1e-5)
            layer.weight.data.add_(1.0)  # in place, through .data
            torch.testing.assert_close(model(x).double(), _ref_model_out(model, x), rtol=1e-5, atol=1e-5)
            cache.clear()  # a miss computes exactly what a hit returns
            assert torch.equal(model(x), y6 := model(x)) and cache.builds == 4
        assert layer.cache is None
        torch.testing.assert_close(model(x).double(), y6.double(), rtol=1e-5, atol=1e-5)


def test_frozen_base_keeps_w_plus_delta_and_rebuilds_when_anything_it_read_changes():
    """``cached(model, frozen_base=True)``: one kept ``W + s·ΔW`` per layer, bit-identical to the default mode;
    rebuilt when λ/γ values (fused-optimiser-style ``.data`` writes included), the active adapter, the weight
    Parameter, its storage or its version change; every parameter bitwise unchanged after the block."""
    model = _model()
    model.eval()
    randlora.inject(model, targets=["0", "2"], r=4, name="b")
    layer = _layers(model)[0][1]
    x = torch.randn(16, 24)
    with torch.no_grad():
        with randlora.cached(model):
            want = model(x)
        with randlora.cached(model, frozen_base=True) as names:
            cache = layer.cache
            assert names == ["0", "2"] and cache.frozen_base
            assert torch.equal(model(x), want) and torch.equal(model(x), want) and cache.builds == 1
            assert cache.entry.kept.shape == (40, 24) and cache.entry.kept.dtype == torch.float32
            layer.randlora_gamma.data.mul_(1.5)  # no version bump: seen by value
            y = model(x)
            assert cache.builds == 2
            torch.testing.assert_close(y.double(), _ref_model_out(model, x), rtol=1e-5, atol=1e-5)
            layer.weight.add_(0.25)  # in place through autograd: version counter
            torch.testing.assert_close(model(x).double(), _ref_model_out(model, x), rtol=1e-5, atol=1e-5)
            assert cache.builds == 3
            layer.weight.data = layer.weight.data * 0.5  # new storage
            torch.testing.assert_close(model(x).double(), _ref_model_out(model, x), rtol=1e-5, atol=1e-5)
            assert cache.builds == 4
            randlora.use(model, "b")  # another adapter: its (zero) update, not the kept one
            torch.testing.assert_close(model(x).double(), _ref_model_out_plain(model, x), rtol=1e-5, atol=1e-5)
            assert cache.builds == 5
            randlora.use(model, "default")
        assert layer.cache is None
    fresh = _model()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    params = list(fresh.parameters())
    with torch.no_grad(), randlora.cached(fresh, frozen_base=True):
        fresh(x), fresh(x)
    assert list(fresh.parameters()) == params  # the same Parameters, never written
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(randlora.ConfigError, match="frozen_base must be True or False"):
        with randlora.cached(model, frozen_base=1):
            pass


def _count_planned(monkeypatch):
    """Count the calls that go through the core's planner and executor (an armed call does not)."""
    from randlora import core

    calls = []
    real = core.call
    monkeypatch.setattr(core, "call", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_frozen_base_arms_each_model_call_once_and_gives_the_same_bits(monkeypatch):
    """Inside ``cached(frozen_base=True)`` a no-grad call of the model checks each kept matrix once before it
    runs, and its layers' calls are then one matmul (no route planned); the bits equal the default mode's.
    Not armed: a layer called on its own, calls with grad, under autocast, in another dtype, in training
    with dropout; nothing stays armed after a call, one that raised included."""
    model = _model()
    model.eval()
    layers = [m for _, m in _layers(model)]
    x = torch.randn(5, 24)
    with torch.no_grad():
        with randlora.cached(model):
            want, want1 = model(x), model(x[:1])
        planned = _count_planned(monkeypatch)
        with randlora.cached(model, frozen_base=True):
            assert torch.equal(model(x), want) and len(planned) == 2  # the first call builds on the routed path
            assert torch.equal(model(x), want) and torch.equal(model(x[:1]), want1) and len(planned) == 2
            assert all(m._armed is None for m in layers)  # only during a call of the model
            layers[0].randlora_lambda.data.add_(1e-3)  # seen by value at the next model call
            moved = model(x)
            assert len(planned) == 2 and layers[0].cache.builds == 2 and not torch.equal(moved, want)
            torch.testing.assert_close(moved.double(), _ref_model_out(model, x), rtol=1e-5, atol=1e-5)
            assert torch.equal(model[0](x), F.linear(x, layers[0].cache.entry.kept, model[0].bias))
            assert len(planned) == 3  # a layer called alone takes the routed path
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x)
            assert len(planned) == 5
            model(x.double())  # another dtype: cast on the routed path, as outside the block
            assert len(planned) == 7
            with torch.enable_grad():
                model(x)
            assert len(planned) == 9
            model[1].register_forward_hook(_Raise())
            with pytest.raises(RuntimeError, match="once"):
                model(x)
            assert all(m._armed is None for m in layers)
            torch.testing.assert_close(model(x), moved, rtol=0, atol=0)
    layers[0].dropout = nn.Dropout(0.5)
    model.train()
    with torch.no_grad(), randlora.cached(model, frozen_base=True):
        model(x)
        before = len(planned)
        model(x)
        assert len(planned) == before + 1  # dropout in training: the routed path; the other layer stays armed


class _Raise:
    def __init__(self):
        self.done = False

    def __call__(self, *_):
        if not self.done:
            self.done = True
            raise RuntimeError("once")


def test_frozen_base_budget_counts_the_weights_dtype():
    model = _model().to(torch.bfloat16)  # two layers of 40 x 24: 1920 bytes each kept in bfloat16
    with randlora.cached(model, max_bytes=4000) as names:
        assert names == ["0"]  # s·ΔW in float32: 3840 bytes each
    with randlora.cached(model, max_bytes=4000, frozen_base=True) as names:
        assert names == ["0", "2"]


def _ref_model_out_plain(model, x):
    """The model's output with every adapter term zero (adapter "b" as injected: ΔW = 0)."""
    h = x.double()
    for mod in model:
        h = torch.nn.functional.linear(h, mod.weight.double(), mod.bias.double()) if hasattr(mod, "weight") else mod(h)
    return h


def test_cached_budget_and_bad_budget():
    model = _model()  # two layers of 40 x 24 float32: 3840 bytes each
    with randlora.cached(model, max_bytes=4000) as names:
        assert names == ["0"] and model[2].cache is None
    with randlora.cached(model, max_bytes=0) as names:
        assert names == []
    for bad in (-1, 1.5, True, "1GB"):
        with pytest.raises(randlora.ConfigError, match="max_bytes"):
            with randlora.cached(model, max_bytes=bad):
                pass
    with pytest.raises(randlora.StateError, match="no RandLora adapter"):
        with randlora.cached(nn.Linear(2, 2)):
            pass


def test_set_keep_rejects_bad_values():
    model = _model()
    layer = _layers(model)[0][1]
    with pytest.raises(randlora.ConfigError, match="keep must be one of"):
        layer.set_keep("sometimes")
    assert layer.keep == "auto"


@pytest.mark.parametrize("path", ["weight", "activation"])
def test_scratch_buffers_never_leak_into_results(path):
    """The op reuses per-thread scratch buffers for S and W + s·ΔW: outputs and grads must not alias them."""
    model = _model()
    for _, layer in _layers(model):
        layer.set_path(path)
        layer.set_keep("never")
    x = torch.randn(32, 24, requires_grad=True)
    y1 = model[0](x)
    keep = y1.detach().clone()
    y2 = model[2](torch.tanh(y1))  # a second layer of another shape reuses the buffers
    y2.square().sum().backward()
    assert torch.equal(y1.detach(), keep)
    gx = x.grad.clone()
    model(torch.randn(32, 24)).sum().backward()  # more calls: earlier gradients stay as they were
    assert torch.equal(x.grad, gx)
    torch.testing.assert_close(y1.double(), _ref_model_out(nn.Sequential(model[0]), x.detach()), rtol=1e-5, atol=1e-5)
    ops.release_workspace()


@pytest.mark.parametrize("cached", [False, True])
def test_route_is_a_function_of_the_call_alone(cached):
    """Micro-batches, optimiser steps and earlier calls never change what a call saves for backward (what
    activation checkpointing requires); only the explicit settings do."""
    model = _model()
    layer = _layers(model)[0][1]
    T = 32  # T < O = 40 <= 3T: the window where a history-dependent rule changed its mind
    opt = torch.optim.SGD(randlora.trainable_parameters(model), lr=1e-3)
    metas = []
    with randlora.cached(model) if cached else contextlib.nullcontext():
        for step in range(3):
            for _ in range(2):
                _, saved = _saved(lambda: layer(torch.randn(T, 24, requires_grad=True)))
                metas.append([(tuple(t.shape), t.dtype) for t in saved])
            opt.step()
    assert all(m == metas[0] for m in metas)
    nr = layer.n * layer.r
    kept = sum(shape == (40, 24) for shape, _ in metas[0]) == 3  # W, the B view, and W + s·ΔW if kept
    assert kept == (plan_call(T=T, O=40, I=24, nr=nr, r=layer.r, cached=cached).build is not None)
