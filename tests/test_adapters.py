"""Every adapter held the same way (``layer.adapter(name)``, one ``Adapter`` type), ``randlora.delete``, the
settings read back from files, and loading adapters into a running model without walking the ones loaded."""

from __future__ import annotations

import copy
import gc
import inspect
import json
import weakref
from unittest import mock

import pytest
import torch
from torch import nn

import randlora
from randlora import Adapter, AdapterConfig, RandLoraLinear
from randlora.paths import walk
from randlora.walker import adapted_layers, bank_of, config_of, registry_of
from models import TARGETS, Net, randomize

SUBSET = ["layers.0.q_proj", "layers.1.up_proj"]  # adapter "c" lives on these two layers only
SPEC = {  # added in this order: "a" first, "b" with its own scale, init and dropout, "c" on two layers
    "a": dict(targets=TARGETS, alpha=8.0),
    "b": dict(targets=TARGETS, alpha=12.0, init="peft", dropout=0.1),
    "c": dict(targets=SUBSET, alpha=4.0),
}


def build(base: nn.Module, names, bias: str = "none") -> nn.Module:
    """A copy of ``base`` with the adapters ``names`` of :data:`SPEC`, in that order, each with its own values
    (the same values whichever other adapters the model has)."""
    model = copy.deepcopy(base)
    for nm in names:
        spec = dict(SPEC[nm])
        randlora.inject(model, spec.pop("targets"), r=4, bias=bias, name=nm, **spec)
        randomize(model, ord(nm), nm)
    return model.eval()


def snapshot(model: nn.Module):
    reg = registry_of(model) if bank_of(model) is not None else None
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, id(m)) for n, m in model.named_modules()],
            {n: (id(p), p.requires_grad) for n, p in model.named_parameters()},
            (list(reg.adapters), reg.active) if reg is not None else None)


def assert_same(a, b) -> None:
    assert a[1:] == b[1:]
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def expected_keys(base: nn.Module, adapters: dict[str, list[str]]) -> list[str]:
    """State-dict keys of ``base`` adapted by ``adapters`` (path -> the names on it, in the order added): each
    adapted layer's own parameters, then its first adapter's ``λ``/``γ``, then ``randlora_extra.<name>.…``."""
    keys = []
    for path, mod in base.named_modules():
        keys += [f"{path}.{k}" for k, p in mod._parameters.items() if p is not None]
        names = adapters.get(path, [])
        keys += [f"{path}.randlora_{w}" for w in ("lambda", "gamma") if names]
        keys += [f"{path}.randlora_extra.{nm}.randlora_{w}" for nm in names[1:] for w in ("lambda", "gamma")]
    return keys


def layer_names(base: nn.Module, names) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for nm in names:
        for path, _ in base.named_modules():
            tg = SPEC[nm]["targets"]
            if path in tg or any(path.endswith("." + t) for t in tg):
                out.setdefault(path, []).append(nm)
    return out


# ------------------------------------------------------------------------------------------------
# the names state dicts, optimisers and engines see
# ------------------------------------------------------------------------------------------------
def test_state_dict_and_parameter_names_of_one_and_of_several_adapters():
    base = Net().eval()
    for names in (["a"], ["a", "b"], ["a", "b", "c"]):
        model = build(base, names)
        want = expected_keys(base, layer_names(base, names))
        assert list(model.state_dict()) == want  # also the order
        assert [n for n, _ in model.named_parameters()] == want
        if names == ["a"]:
            assert "layers.0.q_proj.randlora_lambda" in want and not any("extra" in k for k in want)
        # a full-model state dict saved by torch loads, strictly, into the same model built again
        fresh = build(base, names)
        for nm in names:
            randomize(fresh, 99, nm)
        fresh.load_state_dict(model.state_dict())
        x = torch.randn(3, 12)
        for nm in names:
            randlora.use(model, nm)
            randlora.use(fresh, nm)
            assert torch.equal(fresh(x), model(x))


def test_every_adapter_is_an_adapter_with_the_same_view():
    model = build(Net(), ["a", "b", "c"])
    for path, layer in adapted_layers(model):
        assert layer.adapter("a") is layer and layer.adapter_names()[0] == "a"
        for nm in layer.adapter_names():
            ad = layer.adapter(nm)
            assert isinstance(ad, Adapter) and ad.scaling == SPEC[nm]["alpha"] / 4
            assert ad.randlora_lambda.shape == (4, layer.n) and ad.randlora_gamma.shape == (layer.n, layer.m)
            assert ad.init == SPEC[nm].get("init", "sqrt") and ad.drops == ("dropout" in SPEC[nm])
        assert layer.adapter("zz") is None
        assert (layer.adapter("c") is not None) == (path in SUBSET)
    randlora.use(model, "b")
    assert all(l.adapter() is l.randlora_extra["b"] for _, l in adapted_layers(model))


# ------------------------------------------------------------------------------------------------
# AdapterConfig and files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"r": 8}, {"init": "peft"}, {"r": 8, "init": "peft"}, {"init": "sqrt"}])
def test_adapter_config_defaults_agree_with_inject(kw):
    sig = inspect.signature(randlora.inject).parameters
    model = Net(d=40, h=64)  # r=32 (the default) fits
    randlora.inject(model, TARGETS, **kw)
    got = config_of(model)
    assert AdapterConfig(targets=got.targets, **kw) == got
    cfg = AdapterConfig(targets=[])
    assert (cfg.r, cfg.init, cfg.alpha) == (sig["r"].default, sig["init"].default,
                                            randlora.INITS[sig["init"].default].alpha_scale * sig["r"].default)


def test_stored_configs_missing_settings_keep_their_old_meaning():
    assert AdapterConfig.from_dict({"targets": ["x"]}) == AdapterConfig(targets=["x"], alpha=640.0, init="peft")
    cfg = AdapterConfig.from_dict({"targets": ["x"], "r": 8, "init": "sqrt"})
    assert (cfg.alpha, cfg.init) == (640.0, "sqrt")  # a file without alpha: 640, whatever its init
    cfg = AdapterConfig.from_dict({"targets": ["x"], "r": 8, "alpha": 16.0})
    assert (cfg.alpha, cfg.init) == (16.0, "peft")  # a file without init: peft's start
    with pytest.raises(TypeError):
        AdapterConfig.from_dict({"targets": ["x"], "rank": 8})


@pytest.mark.parametrize("drop", [("init",), ("alpha",), ("alpha", "init")])
def test_a_file_without_alpha_or_init_loads_as_it_was_written(tmp_path, drop):
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = Net()
    model = copy.deepcopy(base)
    randlora.inject(model, TARGETS, r=4, alpha=640.0, init="peft")  # what such files were made with
    randomize(model, 3, "default")
    path = randlora.save(model, tmp_path / "a.safetensors", save_projection=False)
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    for k in drop:
        del cfg[k]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=dict(meta, config=json.dumps(cfg)))
    plain = copy.deepcopy(base)
    randlora.load(plain, tmp_path / "old.safetensors")
    x = torch.randn(3, 12)
    assert torch.equal(plain(x), model(x))
    got = config_of(plain)
    assert (got.alpha, got.init) == (640.0, "peft")
    assert all(l.scaling == 160.0 and l.init == "peft" for _, l in adapted_layers(plain))


# ------------------------------------------------------------------------------------------------
# delete
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", ["none", "randlora_only", "all"])
@pytest.mark.parametrize("names, gone", [("abc", "a"), ("abc", "b"), ("abc", "c"), ("ac", "a"), ("ac", "c")])
def test_delete_leaves_the_model_it_would_be_without_that_adapter(names, gone, bias):
    """First, middle, last; with "ac", deleting "a" leaves layers without any adapter (their modules go back)."""
    base = Net()
    with torch.no_grad():
        for n, p in base.named_parameters():
            if n.endswith("bias"):
                p.add_(0.1)
    model = build(base, names, bias=bias)
    rest = [nm for nm in names if nm != gone]
    ref = build(base, rest, bias=bias)
    randlora.delete(model, gone)
    assert randlora.adapter_names(model) == rest
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in ref.named_modules()]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        n: p.requires_grad for n, p in ref.named_parameters()}
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref) and all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    x = torch.randn(4, 12)
    for nm in rest:
        randlora.use(model, nm)
        randlora.use(ref, nm)
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-6)
        assert randlora.state_dict(model, name=nm).keys() == randlora.state_dict(ref, name=nm).keys()
    rows = [(rest + [None])[i % (len(rest) + 1)] for i in range(4)]
    with torch.no_grad():
        with randlora.mixed(model, rows):
            y = model(x)
        with randlora.mixed(ref, rows):
            torch.testing.assert_close(y, ref(x), rtol=0, atol=1e-6)


def test_delete_frees_the_parameters():
    model = build(Net(), "abc")
    for gone in ("a", "c"):  # the first (held in the layers' own slots), then one on two layers only
        held = [l.adapter(gone) for _, l in adapted_layers(model) if l.adapter(gone) is not None]
        refs = [weakref.ref(p) for ad in held for p in (ad.randlora_lambda, ad.randlora_gamma)]
        size = sum(r().numel() for r in refs)
        before = sum(p.numel() for p in model.parameters())
        del held
        randlora.delete(model, gone)
        gc.collect()
        assert sum(p.numel() for p in model.parameters()) == before - size
        assert all(r() is None for r in refs)  # nothing holds them: the memory is free
        assert gone not in registry_of(model).adapters
        assert not any(f".{gone}." in n for n, _ in model.named_parameters())
    assert randlora.adapter_names(model) == ["b"]
    assert [n for n, _ in model.named_parameters()] == expected_keys(Net(), layer_names(Net(), ["b"]))


def test_deleting_the_active_adapter_activates_the_next_one_else_the_one_before():
    model = build(Net(), "abc")
    randlora.use(model, "a")
    randlora.delete(model, "b")
    assert randlora.active_adapter(model) == "a"  # another one: the active one stays
    model = build(Net(), "abc")
    randlora.use(model, "b")
    randlora.delete(model, "b")
    assert randlora.active_adapter(model) == "c"  # the one added after it
    randlora.delete(model, "c")
    assert randlora.active_adapter(model) == "a"  # the newest one went: the one before it
    model = build(Net(), "abc")
    randlora.delete(model, "a")  # the first, active
    assert randlora.active_adapter(model) == "b"


def test_deleting_the_only_adapter_gives_back_the_original_model():
    base = Net()
    base.layers[0].q_proj.bias.requires_grad_(False)
    model = copy.deepcopy(base)
    originals = [(n, m) for n, m in model.named_modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    randlora.inject(model, TARGETS, r=4, bias="all")
    randomize(model, 1, "default")
    randlora.inject(model, ["q_proj"], r=4, bias="all", name="b")
    randlora.delete(model, "default")
    assert randlora.adapter_names(model) == ["b"]
    randlora.delete(model, "b")
    assert [(n, id(m)) for n, m in model.named_modules()] == [(n, id(m)) for n, m in originals]
    assert bank_of(model) is None and not any(isinstance(m, RandLoraLinear) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    sd, sd0 = model.state_dict(), base.state_dict()
    assert list(sd) == list(sd0) and all(torch.equal(sd[k], sd0[k]) for k in sd)
    x = torch.randn(2, 12)
    assert torch.equal(model(x), base(x))
    randlora.inject(model, TARGETS, r=4)  # a plain model again: inject works as on any other


def test_delete_the_first_then_train_save_and_add_it_again(tmp_path):
    base = Net()
    model = build(base, "abc")
    randlora.use(model, "a")
    x = torch.randn(4, 12)
    ya = model(x).detach()
    path = randlora.save(model, tmp_path / "a.safetensors", name="a")
    randlora.delete(model, "a")
    # the adapter that moved into the layers' slots trains, and only it
    model.train()
    randlora.use(model, "b")
    model(x).square().sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {k for k in expected_keys(base, layer_names(base, ["b"])) if "randlora_" in k
                     and "extra" not in k}
    # its file is what a model that only ever had it writes
    model.eval()
    ref = build(base, "b")
    sd, sd_ref = randlora.state_dict(model, name="b"), randlora.state_dict(ref)
    assert sd.keys() == sd_ref.keys() and all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    # the same name again: a new adapter (zero update), then loaded from its file
    randlora.inject(model, TARGETS, r=4, alpha=8.0, name="a")
    assert randlora.adapter_names(model) == ["b", "c", "a"]
    assert all(torch.equal(l.adapter("a").randlora_lambda, torch.zeros(4, l.n)) for _, l in adapted_layers(model))
    randlora.delete(model, "a")
    randlora.load(model, path, name="a")
    randlora.use(model, "a")
    torch.testing.assert_close(model(x), ya, rtol=0, atol=1e-6)


def test_refused_deletes_leave_the_model_as_it_was():
    model = build(Net(), "abc")
    before = snapshot(model)
    for bad in ("zz", None, 3):
        with pytest.raises(randlora.StateError, match=r"^the model has no adapter .* to delete; its adapters are "
                                                      r"\['a', 'b', 'c'\]\. Pass one") as e:
            randlora.delete(model, bad)
        assert len(str(e.value)) < 1500
    with torch.no_grad(), randlora.mixed(model, ["a", "c"]):
        with pytest.raises(randlora.StateError, match=r"^the model is inside randlora.mixed.*'b'.*Leave the "
                                                      "block first"):
            randlora.delete(model, "b")
    assert_same(before, snapshot(model))
    randlora.merge(model, name="b", unload=False)
    merged = snapshot(model)
    with pytest.raises(randlora.StateError, match=r"^the model is merged .*adapter 'c'.*"
                                                  r"randlora.unmerge\(model\) first"):
        randlora.delete(model, "c")
    assert_same(merged, snapshot(model))
    randlora.unmerge(model)
    randlora.delete(model, "c")  # the fix works
    with pytest.raises(randlora.StateError, match="no RandLora adapter"):
        randlora.delete(Net(), "a")
    for i in range(60):  # a server's many adapters: the message names a few and counts the rest
        randlora.inject(model, ["q_proj"], r=4, name=f"tenant_{i}")
    with pytest.raises(randlora.StateError, match=r"'a', 'b', .* and 52 more\]\. Pass one") as e:
        randlora.delete(model, "zz")
    assert len(str(e.value)) < 1500


def test_delete_through_a_wrapper_finds_the_adapter():
    inner = build(Net(), "ab")
    outer = nn.Sequential(inner, nn.Linear(5, 2))
    randlora.delete(outer, "a")
    assert randlora.adapter_names(inner) == ["b"]


# ------------------------------------------------------------------------------------------------
# loading into a running model
# ------------------------------------------------------------------------------------------------
def test_walk_is_named_modules_without_the_inside_of_adapted_layers():
    model = build(Net(), "abc")
    shared = nn.Linear(3, 3)
    model.extra_a, model.extra_b = shared, shared  # one module under two names
    inside = [n for n, m in model.named_modules() if isinstance(m, RandLoraLinear)]
    for dup in (True, False):
        want = [(n, m) for n, m in model.named_modules(remove_duplicate=dup)
                if not any(n.startswith(p + ".") for p in inside)]
        assert [(n, id(m)) for n, m in walk(model, remove_duplicate=dup)] == [(n, id(m)) for n, m in want]


def test_loading_into_a_running_model_reuses_the_bank_and_never_walks_the_loaded_adapters(tmp_path):
    base = Net()
    model = build(base, "a")
    path = randlora.save(model, tmp_path / "a.safetensors", save_projection=False, name="a")
    bank = bank_of(model)
    A_ptr = bank.A.data_ptr()
    layers = {p: id(l) for p, l in adapted_layers(model)}
    refuse = mock.Mock(side_effect=AssertionError("a module or parameter walk that visits every adapter"))
    with mock.patch.object(nn.Module, "named_modules", refuse), mock.patch.object(nn.Module, "modules", refuse), \
            mock.patch.object(nn.Module, "named_parameters", refuse), mock.patch.object(nn.Module, "parameters", refuse):
        for i in range(20):
            randlora.load(model, path, name=f"n{i}")
    assert bank_of(model) is bank and bank.A.data_ptr() == A_ptr  # not rebuilt
    assert {p: id(l) for p, l in adapted_layers(model)} == layers  # not re-injected
    assert len(randlora.adapter_names(model)) == 21
    randlora.use(model, "n19")
    x = torch.randn(2, 12)
    randlora.use(model, "a")
    ya = model(x)
    randlora.use(model, "n19")
    assert torch.equal(model(x), ya)
