"""``W + s·ΔW`` built through ternary bases' non-zeros (``randlora.sparse.sparse_delta``): against the float64
reference and gradcheck; where the planner takes it (``Route.build == "nonzeros"``, ``planner.sparse_build_pays``);
and what uses it: a layer's prebuilt weight (no-grad calls and kept training steps), merges and ``delta_weight``."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import randlora
from randlora import core as layer_mod
from randlora import costs, planner
from randlora.planner import build_cost, plan_call, sparse_build_pays
from randlora.sparse import SparseIndex, sparse_delta
from bench_loader import load_benchmark
from reference import layer_delta, reference_delta, reference_linear
from test_sparse import S, leaves, ternary_views


@settings(max_examples=40, deadline=None)
@given(O=st.integers(1, 70), I=st.integers(1, 70), r=st.sampled_from([1, 2, 3, 4, 8]),
       density=st.sampled_from([0.5, 0.3, 0.1]), with_W=st.booleans(), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_sparse_delta_matches_the_float64_reference(O, I, r, density, with_W, seed, dtype):
    A, B, A_bank, B_bank = ternary_views(O, I, r, density, seed=seed)
    _, W, _, lam, gam = leaves(O, I, r, 1, seed=seed + 1)
    idx = SparseIndex(A.to(dtype), B.to(dtype), r)
    W_in = W.detach().to(dtype) if with_W else None
    got = sparse_delta(idx, lam.detach().to(dtype), gam.detach().to(dtype), S, O < I, dtype, W_in)
    want = reference_delta(lam.to(dtype).detach(), gam.to(dtype).detach(), A_bank.to(dtype), B_bank.to(dtype), O,
                           I, S)
    if with_W:
        want = want + W_in.double()
    assert got.dtype == dtype and got.shape == (O, I)
    scale = want.abs().max().item() + 1e-12
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]  # bf16: the result's rounding
    assert (got.double() - want).abs().max().item() <= tol * scale


@pytest.mark.parametrize("O,I", [(12, 7), (7, 12), (9, 9)])
def test_sparse_delta_gradcheck(O, I):
    A, B, _, _ = ternary_views(O, I, 3, 0.4)
    idx = SparseIndex(A, B, 3)
    _, W, _, lam, gam = leaves(O, I, 3, 1)
    assert torch.autograd.gradcheck(lambda l, g, w: sparse_delta(idx, l, g, S, O < I, torch.float64, w),
                                    (lam, gam, W))
    assert torch.autograd.gradcheck(lambda l, g: sparse_delta(idx, l, g, S, O < I, torch.float64), (lam, gam))


def test_the_planner_builds_through_the_non_zeros_where_that_is_cheaper():
    cpu = costs.DEVICE_COSTS["cpu"]
    assert sparse_build_pays(1 / 32) and sparse_build_pays(1 / math.sqrt(384))  # very_sparse, 1024 and 384 wide
    assert not sparse_build_pays(1 / 3) and not sparse_build_pays(None)  # sparse bases; dense bases
    assert not sparse_build_pays(1 / 32, "cuda")  # the CUDA row's arithmetic: dense builds there
    full = 2816 * 1024 * 1024
    assert build_cost(2816, 1024, 1024, 1 / 32) == pytest.approx(full * cpu.build_weight / 32)
    assert build_cost(2816, 1024, 1024, 1 / 3) == build_cost(2816, 1024, 1024) == full
    d = dict(O=384, I=384, nr=384, r=32, grad=False, threads=2)
    vs = plan_call(T=512, density=1 / math.sqrt(384), **d)  # no-grad: a prebuilt W + s·ΔW, nothing kept after
    assert (vs.kind, vs.forward, vs.build, vs.keeps) == ("dense", "kept", "nonzeros", ())
    assert plan_call(T=512, **d).build is None  # dense bases: the op's own weight route (the same build)
    assert plan_call(T=512, density=1 / math.sqrt(384), compiling=True, **d).build is None  # nothing prebuilt
    assert plan_call(T=512, density=1 / math.sqrt(384), path="activation", **d).forward == "activation"
    tr = plan_call(T=8192, O=1024, I=1024, nr=1024, r=32, density=1 / 32, path="weight", threads=2)
    assert (tr.forward, tr.build, tr.grad_x) == ("kept", "nonzeros", "kept")  # a training step that keeps it


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 384), nn.ReLU(), nn.Linear(384, 256))  # widening and narrowing
    randlora.inject(model, ["0", "2"], r=32, bases="very_sparse")
    with torch.no_grad():
        for i in (0, 2):
            model[i].randlora_lambda.normal_()
    return model


def test_a_no_grad_call_and_a_merge_build_through_the_non_zeros():
    model = _model()
    x = torch.randn(2, 300, 256)
    spy = mock.Mock(wraps=layer_mod.sparse_delta)
    with torch.no_grad(), mock.patch.object(layer_mod, "sparse_delta", spy), \
            mock.patch.object(layer_mod, "build_weight", side_effect=AssertionError("dense build")):
        for i in (0, 2):
            assert model[i].route(600, need_x=False).build == "nonzeros"
        y = model(x)
        deltas = [model[i].delta_weight() for i in (0, 2)]
    assert spy.call_count == 4  # two prebuilt weights, two deltas
    with torch.no_grad(), mock.patch.object(layer_mod, "sparse_delta", spy), \
            mock.patch.object(layer_mod, "dense_delta", side_effect=AssertionError("dense build")):
        with randlora.cached(model) as names:  # the cached s·ΔW, built through the non-zeros once per layer
            assert names == ["0", "2"]
            y_cached = [model(x) for _ in range(2)]
    assert spy.call_count == 6
    assert all(torch.allclose(t, y, rtol=1e-5, atol=1e-3) for t in y_cached)  # outputs ~1e3: float32 rounding
    h = torch.relu(reference_linear(x, model[0].weight, model[0].bias, layer_delta(model[0])))
    want = reference_linear(h, model[2].weight, model[2].bias, layer_delta(model[2]))
    assert _rel_err(y, want) < 2e-6  # float32 rounding (the dense views' build: 4e-7 here)
    for i, D in zip((0, 2), deltas):
        assert _rel_err(D, layer_delta(model[i])) < 1e-6
    W0 = [model[i].weight.detach().double() + layer_delta(model[i]) for i in (0, 2)]
    W_before = [model[i].weight.detach().clone() for i in (0, 2)]
    with mock.patch.object(layer_mod, "dense_delta", side_effect=AssertionError("dense build")):
        randlora.merge(model, unload=False)
        for i, W in zip((0, 2), W0):
            assert _rel_err(model[i].weight, W) < 1e-6
        randlora.unmerge(model)
    for i, W in zip((0, 2), W_before):  # back to W, up to float32 rounding of W + s·ΔW
        assert (model[i].weight - W).abs().max() < 1e-6 * layer_delta(model[i]).abs().max()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def test_a_training_step_that_keeps_the_sparse_build_matches_the_reference():
    model = _model()
    for i in (0, 2):
        model[i].set_keep("always")
    x = torch.randn(3, 40, 256, requires_grad=True)
    for i in (0, 2):
        assert model[i].route(120).build == "nonzeros"
    y = model(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    lam = [model[i].randlora_lambda.detach().double().requires_grad_() for i in (0, 2)]
    gam = [model[i].randlora_gamma.detach().double().requires_grad_() for i in (0, 2)]
    xr = x.detach().double().requires_grad_()
    Ds = [reference_delta(lam[k], gam[k], model[i].bank.A, model[i].bank.B, model[i].out_features,
                          model[i].in_features, model[i].scaling) for k, i in enumerate((0, 2))]
    h = torch.relu(reference_linear(xr, model[0].weight.detach(), model[0].bias.detach(), Ds[0]))
    ((reference_linear(h, model[2].weight.detach(), model[2].bias.detach(), Ds[1]) * gy.double()).sum()).backward()
    assert _rel_err(x.grad, xr.grad) < 1e-5
    for k, i in enumerate((0, 2)):
        assert _rel_err(model[i].randlora_lambda.grad, lam[k].grad) < 1e-5
        assert _rel_err(model[i].randlora_gamma.grad, gam[k].grad) < 1e-5


def test_the_builds_benchmark_runs_and_its_builds_agree(capsys):
    mod = load_benchmark("sparse_op")
    threads = torch.get_num_threads()
    try:
        mod.main(["--builds", "--shapes", "96x64", "64x96", "--modes", "very_sparse", "sparse", "--reps", "1",
                  "--r", "8"])
    finally:
        torch.set_num_threads(threads)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 96×64") or line.startswith("| 64×96")]
    assert len(rows) == 4  # 2 shapes × 2 modes
    assert all(float(r[-1]) < 1e-5 and float(r[4]) > 0 for r in rows)  # the two builds agree; both timed
