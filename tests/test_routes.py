"""Deciding apart from executing: the public seam that forces routes (``randlora.force_route``), mixed-batch plans
that explain themselves, ``randlora.mixed`` without any attribute set on a layer, and the functional core's
gradient projection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import randlora
from randlora import core, planner
from randlora.walker import adapted_layers

from models import randomize
from reference import reference_delta
from test_serving import alone


def _model(bases="dense", names=("default", "b")):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 12))
    for name in names:
        randlora.inject(model, "all-linear", r=4, bases=bases, name=None if name == "default" else name)
    for seed, name in enumerate(names):
        randomize(model, seed, name)
    return model


def _settings(model):
    return [(l.path, l.keep, l.mixed) for _, l in adapted_layers(model)]


def test_force_route_sets_each_setting_for_the_block_and_puts_each_layer_s_own_back():
    model = _model()
    model[0].set_keep("never")
    before = _settings(model)
    x = torch.randn(6, 12, requires_grad=True)
    with torch.no_grad():
        want = model(x)
    for path in ("weight", "activation"):
        with randlora.force_route(model, path, keep="always"):
            assert {l.path for _, l in adapted_layers(model)} == {path}
            assert all(l.route(6).forward == ("activation" if path == "activation" else "kept")
                       for _, l in adapted_layers(model))
            y = model(x)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        assert _settings(model) == before
    with pytest.raises(RuntimeError, match="boom"), randlora.force_route(model, "activation"):
        raise RuntimeError("boom")
    assert _settings(model) == before


@pytest.mark.parametrize("kw", [dict(path="sideways"), dict(keep="sometimes"), dict(mixed="fast"),
                                dict(path="sparse"), dict(mixed="batched-sparse")])
def test_force_route_refuses_a_bad_value_and_leaves_every_layer_as_it_was(kw):
    model = _model()  # dense bases: "sparse" and "batched-sparse" have nothing to run on
    before = _settings(model)
    with pytest.raises(randlora.ConfigError, match="must be one of|needs ternary bases"):
        with randlora.force_route(model, **kw):
            pass
    assert _settings(model) == before
    with pytest.raises(randlora.StateError, match="no adapted layer"):
        with randlora.force_route(nn.Linear(3, 3), path="weight"):
            pass


@pytest.mark.parametrize("bases", ["dense", "very_sparse"])
def test_every_forced_mixed_pass_gives_the_rows_run_alone(bases):
    model = _model(bases).eval()
    names = ["b", None, "default", "b"]
    x = torch.randn(4, 3, 12, dtype=torch.float32)
    want = alone(model, names, x)
    with torch.no_grad():
        passes = ["grouped", "batched"] + (["batched-sparse"] if bases != "dense" else [])
        for how in passes:
            with randlora.force_route(model, mixed=how), randlora.mixed(model, names) as state:
                y = model(x)
                plan = state.plan(model[0], x.reshape(-1, 12))
            assert plan.kind == how and "forced by the layer's mixed setting" in plan.explain()
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_mixed_sets_no_attribute_on_any_layer_and_clears_the_bank_after():
    model = _model()
    layers = [l for _, l in adapted_layers(model)]
    before = [dict(l.__dict__) for l in layers]
    bank = layers[0].bank
    with randlora.mixed(model, ["b", "default"]) as state:
        model(torch.randn(2, 12))
        assert bank.mixed_block is state
        assert [set(l.__dict__) for l in layers] == [set(d) for d in before]
        assert all("forward" not in l.__dict__ for l in layers)
    assert [set(l.__dict__) for l in layers] == [set(d) for d in before]
    model(torch.randn(2, 12))  # each layer's next call ends the watch after the block
    assert bank.mixed_block is None


def test_mixed_plan_explains_its_decisions_and_is_a_pure_function():
    kw = dict(groups=(("a", 4, False), ("b", 4, False)), T=8, O=1024, I=1024, n=32, r=32, serving=True,
              keep_bytes=1 << 30, itemsize=4)
    p = planner.plan_mixed(**kw)
    assert p is planner.plan_mixed(**kw)  # memoised on its arguments
    text = p.explain()
    assert text.startswith(f"mixed call: {p.kind}")
    assert "dense pass: values moved by one pass" in text and "keep" in text
    # the budget decides: with room for no matrix nothing is kept, and the plan says the memory bound did it
    tight = planner.plan_mixed(**{**kw, "keep_bytes": 1})
    assert tight.keep == () and ("memory bound" in tight.explain() or "by cost" in tight.explain())
    # one adapter on every row with nothing kept is an ordinary call; no adapter on the layer is the base
    assert planner.plan_mixed(**{**kw, "groups": (("a", 8, False),), "keep_bytes": 0}).kind == "plain"
    assert planner.plan_mixed(**{**kw, "groups": ()}).kind == "base"
    # recording gradients: group by group, nothing kept
    train = planner.plan_mixed(**{**kw, "serving": False})
    assert (train.kind, train.keep) == ("grouped", ())


@pytest.mark.parametrize("O,I", [(7, 5), (5, 7), (6, 6)])
def test_project_grad_is_the_gradient_of_the_update(O, I):
    """``core.project_grad(G)`` equals ``(∂λ, ∂γ)`` of ``⟨G, s·ΔW⟩`` by autograd through the float64 reference."""
    model = nn.Sequential(nn.Linear(I, O).double())
    randlora.inject(model, ["0"], r=2)
    layer = model[0]
    with torch.no_grad():
        layer.randlora_lambda.normal_()
    G = torch.randn(O, I, dtype=torch.float64)
    A, B = layer.bank.A, layer.bank.B
    lam = layer.randlora_lambda.detach().clone().requires_grad_()
    gam = layer.randlora_gamma.detach().clone().requires_grad_()
    (reference_delta(lam, gam, A, B, O, I, layer.scaling) * G).sum().backward()
    dlam, dgam = core.project_grad(G, layer, layer.bank)
    torch.testing.assert_close(dlam, lam.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dgam, gam.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_cache_s_value_check_compares_every_bit(dtype):
    """``randlora.cache.same_bits``: the check that keeps a kept ``W + s·ΔW`` valid (one ``memcmp`` on contiguous
    CPU tensors, numpy otherwise) tells apart a one-ulp change, ``-0.0`` from ``0.0``, dtypes and shapes, and sees
    a NaN equal to itself."""
    from randlora.cache import same_bits

    a = torch.randn(7, 33).to(dtype)
    b = a.clone()
    assert same_bits(a, b) and same_bits(a.t(), b.t()) and same_bits(a.t(), b.t().contiguous())
    b.view(-1)[-1] = torch.nextafter(b.view(-1)[-1], torch.tensor(float("inf"), dtype=dtype))
    assert not same_bits(a, b) and not same_bits(a.t(), b.t())
    assert not same_bits(torch.zeros(4, dtype=dtype), -torch.zeros(4, dtype=dtype))
    nan = torch.full((3,), float("nan"), dtype=dtype)
    assert same_bits(nan, nan.clone())
    assert not same_bits(a, a.to(torch.float64 if dtype != torch.float64 else torch.float32))
    assert not same_bits(a, a.reshape(33, 7))


def test_summary_says_what_the_cache_holds():
    model = _model()
    layers = [l for _, l in adapted_layers(model)]
    assert "randlora.cached" not in randlora.summary(model)
    with torch.no_grad(), randlora.cached(model, frozen_base=True):
        assert f"{len(layers)} layers keep W + s·ΔW, 0.0 MiB held now (0 built)" in randlora.summary(model)
        model(torch.randn(3, 12))
        want = sum(4 * (l.out_features * l.in_features + l.randlora_lambda.numel() + l.randlora_gamma.numel())
                   for l in layers)
        assert sum(l.cache.nbytes for l in layers) == want
        assert f"{want / 2**20:.1f} MiB held now ({len(layers)} built)" in randlora.summary(model)
    assert "randlora.cached" not in randlora.summary(model)
