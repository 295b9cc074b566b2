"""Named adapters: several adapters on the same layers, one shared bank, ``use`` / ``merge`` /
``state_dict`` / ``save`` / ``load`` by name, ``disabled`` turning them all off."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import randlora
from randlora.walker import adapted_layers
from models import TARGETS, Net
from models import randomize as _randomize
from reference import reference_delta


def randomize(model: nn.Module, name: str, seed: int) -> None:
    _randomize(model, seed, name)


def reference_forward(base: nn.Module, adapted: nn.Module, name: str | None, x: torch.Tensor) -> torch.Tensor:
    """float64 forward of ``base`` with each adapted layer's weight replaced by ``W + s·ΔW`` of ``name``."""
    ref = copy.deepcopy(base).double()
    mods = dict(ref.named_modules())
    bank = randlora.walker.bank_of(adapted)
    with torch.no_grad():
        for path, layer in adapted_layers(adapted):
            ad = layer.adapter(name) if name is not None else None
            if ad is not None:
                d = reference_delta(ad.randlora_lambda.detach(), ad.randlora_gamma.detach(), bank.A, bank.B,
                                    layer.out_features, layer.in_features, ad.scaling)
                mods[path].weight.add_(d)
    return ref(x.double())


def two_adapters(**kw_b):
    base = Net().double()  # float64 throughout: checked against the reference at 1e-10
    model = copy.deepcopy(base)
    randlora.inject(model, TARGETS, r=4, alpha=8.0)
    randlora.inject(model, TARGETS, r=4, alpha=kw_b.pop("alpha", 12.0), name="b", **kw_b)
    randomize(model, "default", 1)
    randomize(model, "b", 2)
    return base, model


def snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__) for n, m in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_same(a, b):
    assert a[1] == b[1] and a[2] == b[2]
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


# ------------------------------------------------------------------------------------------------
def test_default_adapter_keeps_its_names_and_the_second_shares_the_bank():
    model = Net()
    randlora.inject(model, TARGETS, r=4)
    keys_before = list(model.state_dict())
    sd_before = list(randlora.state_dict(model))
    bank = randlora.walker.bank_of(model)
    A_ptr = bank.A.data_ptr()
    rep = randlora.inject(model, TARGETS, r=4, name="b")
    assert randlora.adapter_names(model) == ["default", "b"]
    assert randlora.active_adapter(model) == "default"  # adding does not switch
    assert randlora.walker.bank_of(model) is bank and bank.A.data_ptr() == A_ptr
    # one bank: the root holds the only bases-sized buffers; layers keep no copy
    assert [n for n, _ in model.named_buffers()] == ["randlora_A", "randlora_B"]
    new_keys = [k for k in model.state_dict() if k not in keys_before]
    assert keys_before == [k for k in model.state_dict() if k in keys_before]
    assert sorted(new_keys) == sorted(f"layers.{i}.{t}.randlora_extra.b.randlora_{w}"
                                      for i in range(2) for t in TARGETS for w in ("lambda", "gamma"))
    assert list(randlora.state_dict(model)) == sd_before
    assert list(randlora.state_dict(model, name="b")) == sd_before  # same keys whatever the adapter's name
    assert rep.trainable == sum(p.numel() for p in randlora.trainable_parameters(model))
    for _, layer in adapted_layers(model):
        ad = layer.randlora_extra["b"]
        assert ad.randlora_lambda.shape == layer.randlora_lambda.shape
        assert ad.randlora_gamma.shape == layer.randlora_gamma.shape
        assert torch.equal(ad.randlora_gamma, layer.randlora_gamma)  # same initialisation: ΔW = 0


def test_use_selects_the_adapter_and_each_matches_the_reference():
    base, model = two_adapters()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    for name in ("default", "b", "default"):
        randlora.use(model, name)
        assert randlora.active_adapter(model) == name
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                y = model(x)
            torch.testing.assert_close(y, reference_forward(base, model, name, x), rtol=1e-10, atol=1e-10)
    randlora.use(model, "b")
    ya = model(x)
    randlora.use(model, "default")
    assert not torch.allclose(model(x), ya)


def test_disabled_turns_every_adapter_off():
    base, model = two_adapters()
    x = torch.randn(4, 12, dtype=torch.float64)
    for name in ("default", "b"):
        randlora.use(model, name)
        with randlora.disabled(model):
            torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
        assert not torch.allclose(model(x), base(x))


def test_training_reaches_only_the_active_adapter():
    _, model = two_adapters(dropout=0.2)
    model.train()
    randlora.use(model, "b")
    model(torch.randn(6, 12, dtype=torch.float64)).square().sum().backward()
    for _, layer in adapted_layers(model):
        assert layer.randlora_lambda.grad is None and layer.randlora_gamma.grad is None
        ad = layer.randlora_extra["b"]
        assert ad.randlora_lambda.grad is not None and ad.randlora_lambda.grad.abs().sum() > 0
        assert isinstance(ad.dropout, nn.Dropout) and ad.dropout.p == 0.2
        assert isinstance(layer.dropout, nn.Identity)  # each adapter keeps its own dropout


def test_adapter_on_a_subset_leaves_the_other_layers_at_their_base():
    base = Net().double()  # float64 throughout: checked against the reference at 1e-10
    model = copy.deepcopy(base)
    randlora.inject(model, TARGETS, r=4)
    randlora.inject(model, ["q_proj"], r=4, name="q", layers=[1])
    randomize(model, "default", 1)
    randomize(model, "q", 3)
    randlora.use(model, "q")
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference_forward(base, model, "q", x), rtol=1e-10, atol=1e-10)
    assert list(randlora.state_dict(model, name="q", save_projection=False)) == [
        "layers.1.q_proj.randlora_lambda", "layers.1.q_proj.randlora_gamma", "randlora_fingerprint"]
    assert randlora.walker.config_of(model).targets == ["layers.1.q_proj"]


@pytest.mark.parametrize("unload", [True, False])
def test_merge_by_name_equals_the_unmerged_adapter(unload):
    base, model = two_adapters()
    x = torch.randn(5, 12, dtype=torch.float64)
    randlora.use(model, "b")
    yb = model(x)
    randlora.use(model, "default")
    yd = model(x)
    randlora.merge(model, name="b", unload=unload)
    torch.testing.assert_close(model(x), yb, rtol=1e-10, atol=1e-10)
    if unload:
        assert not any(True for _ in adapted_layers(model)) and randlora.walker.bank_of(model) is None
        assert list(model.state_dict()) == list(base.state_dict())
    else:
        with pytest.raises(randlora.StateError, match="unmerge"):
            randlora.use(model, "default")
        randlora.unmerge(model)
        torch.testing.assert_close(model(x), yd, rtol=1e-10, atol=1e-10)
        with randlora.disabled(model):
            torch.testing.assert_close(model(x), base(x), rtol=1e-10, atol=1e-10)


def test_merge_while_merged_disabled_subtracts_the_merged_adapter():
    base, model = two_adapters()
    randlora.merge(model, name="b", unload=False)
    x = torch.randn(5, 12, dtype=torch.float64)
    with randlora.disabled(model):
        torch.testing.assert_close(model(x), base(x), rtol=1e-10, atol=1e-10)


def test_state_dict_save_and_load_by_name(tmp_path):
    base, model = two_adapters()
    x = torch.randn(3, 12, dtype=torch.float64)
    randlora.use(model, "b")
    yb = model(x)
    randlora.use(model, "default")
    yd = model(x)
    path = randlora.save(model, tmp_path / "b.safetensors", name="b", save_projection=False)
    _, cfg = randlora.checkpoint.read_file(path)
    assert cfg.alpha == 12.0  # the named adapter's own settings are what the file records
    # into a plain model: becomes its (only) adapter
    plain = copy.deepcopy(base)
    randlora.load(plain, path)
    torch.testing.assert_close(plain(x), yb, rtol=0, atol=0)
    # into an injected model under a new name: added on the same bank, active one unchanged
    other = copy.deepcopy(base)
    randlora.inject(other, TARGETS, r=4, alpha=8.0)
    randlora.load(other, path, name="c")
    assert randlora.adapter_names(other) == ["default", "c"] and randlora.active_adapter(other) == "default"
    randlora.use(other, "c")
    torch.testing.assert_close(other(x), yb, rtol=0, atol=0)
    # load_state_dict by name round-trips exactly (λ, γ; the scale is the adapter's own setting)
    randomize(other, "c", 9)
    assert not torch.allclose(other(x), yb)
    randlora.load_state_dict(other, randlora.state_dict(model, name="b"), name="c")
    torch.testing.assert_close(other(x), yb, rtol=0, atol=0)
    randlora.use(other, "default")
    randomize(other, "default", 10)
    randlora.load_state_dict(other, randlora.state_dict(model, name="default"))  # into the active one
    torch.testing.assert_close(other(x), yd, rtol=0, atol=0)


def test_failed_load_under_a_new_name_leaves_the_model_as_it_was(tmp_path):
    base, model = two_adapters()
    donor = copy.deepcopy(base)
    randlora.inject(donor, TARGETS, r=4, seed=7)  # other bases: the file's fingerprint will not match
    path = randlora.save(donor, tmp_path / "other.safetensors", save_projection=False)
    before = snapshot(model)
    with pytest.raises(randlora.ConfigError, match="seed"):
        randlora.inject(model, TARGETS, r=4, seed=7, name="c")
    with pytest.raises(randlora.CheckpointError, match="seed"):
        randlora.load(model, path, name="c")
    assert_same(before, snapshot(model))
    assert randlora.adapter_names(model) == ["default", "b"]


@pytest.mark.parametrize("kw, error, says", [
    ({"seed": 1}, randlora.ConfigError, "seed"),
    ({"recipe": "peft"}, randlora.ConfigError, "recipe"),
    ({"bases": "sparse"}, randlora.ConfigError, "bases"),
    ({"r": 8}, randlora.ConfigError, "r=8"),
    ({"bias": "all"}, randlora.ConfigError, "bias"),
    ({"name": "b"}, randlora.StateError, "already has an adapter 'b'"),
    ({"name": "a.b"}, randlora.ConfigError, "identifier"),
    ({"name": "train"}, randlora.ConfigError, "identifier"),
    ({"targets": ["q_proj", "lm_head"]}, randlora.TargetError, "lm_head"),
])
def test_a_second_adapter_that_cannot_share_the_bank_is_refused(kw, error, says):
    _, model = two_adapters()
    kw = {"targets": TARGETS, "r": 4, "name": "c", **kw}
    before = snapshot(model)
    with pytest.raises(error, match=says.replace("(", r"\(")) as info:
        randlora.inject(model, **kw)
    assert isinstance(info.value, randlora.RandLoraError)
    assert_same(before, snapshot(model))


def test_unknown_names_are_refused():
    _, model = two_adapters()
    for call in (lambda: randlora.use(model, "zz"), lambda: randlora.merge(model, name="zz"),
                 lambda: randlora.state_dict(model, name="zz"), lambda: randlora.walker.config_of(model, "zz")):
        with pytest.raises(randlora.StateError, match="no adapter 'zz'.*'default', 'b'"):
            call()
    with pytest.raises(randlora.StateError, match="name="):
        randlora.inject(model, TARGETS, r=4)  # a second unnamed inject still explains how to add one


def test_first_adapter_may_be_named_and_eject_removes_all():
    base = Net().double()  # float64 throughout: checked against the reference at 1e-10
    model = copy.deepcopy(base)
    randlora.inject(model, TARGETS, r=4, name="first")
    randlora.inject(model, TARGETS, r=4, name="second")
    assert randlora.adapter_names(model) == ["first", "second"]
    randomize(model, "second", 5)
    randlora.use(model, "second")
    x = torch.randn(2, 12, dtype=torch.float64)
    assert not torch.allclose(model(x), base(x))
    randlora.eject(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in base.named_modules()]
    assert list(model.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("init_a, init_b", [("sqrt", "peft"), ("peft", "sqrt")])
def test_named_adapter_survives_meta_init_and_to_empty(init_a, init_b):
    with torch.device("meta"):
        model = Net()
    randlora.inject(model, TARGETS, r=4, init=init_a)
    randlora.inject(model, TARGETS, r=4, name="b", init=init_b)
    model.to_empty(device="cpu")
    start = {"sqrt": lambda k: k ** -0.5, "peft": lambda k: 1 / k}  # γ = 1/sqrt(max(n, m)) or 1/max(n, m)
    for _, layer in adapted_layers(model):
        k = max(layer.n, layer.m)
        for ad, init in ((layer, init_a), (layer.randlora_extra["b"], init_b)):
            assert torch.equal(ad.randlora_lambda, torch.zeros_like(ad.randlora_lambda))
            assert torch.equal(ad.randlora_gamma, torch.full_like(ad.randlora_gamma, start[init](k)))


@settings(max_examples=8, deadline=None)
@given(r=st.integers(1, 6), k=st.integers(2, 4), seed=st.integers(0, 2**31))
def test_any_number_of_adapters_each_matches_the_reference(r, k, seed):
    torch.manual_seed(seed % 1000)
    base = Net(d=7, h=9).double()  # float64 end to end: compared with the reference at 1e-10
    model = copy.deepcopy(base)
    names = ["default"] + [f"a{i}" for i in range(1, k)]
    randlora.inject(model, TARGETS, r=r, seed=seed)
    for i, nm in enumerate(names[1:], 1):
        randlora.inject(model, TARGETS, r=r, seed=seed, alpha=float(3 + i), name=nm)
    for i, nm in enumerate(names):
        randomize(model, nm, seed + i)
    x = torch.randn(3, 7, dtype=torch.float64)
    for nm in reversed(names):
        randlora.use(model, nm)
        torch.testing.assert_close(model(x), reference_forward(base, model, nm, x), rtol=1e-10, atol=1e-10)
