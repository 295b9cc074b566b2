"""Core behaviour of inject / merge / unmerge / eject / state_dict, against the float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import randlora
from randlora.walker import adapted_layers
from models import TARGETS, Net, randomize
from reference import layer_delta, n_bases, reference_linear




def test_trainable_count_and_freezing():
    model = Net()
    rep = randlora.inject(model, TARGETS, r=3)
    expected = 0
    for _, layer in adapted_layers(model):
        O, I, n = layer.out_features, layer.in_features, n_bases(layer.out_features, layer.in_features, 3)
        expected += n * 3 + n * min(O, I)
    assert rep.trainable == expected == sum(p.numel() for p in randlora.trainable_parameters(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"layers.{i}.{t}.randlora_{w}" for i in range(2) for t in TARGETS for w in ("lambda", "gamma")}
    assert len(rep.rows) == 6 and "trainable" in repr(rep) and "layers.0.q_proj" in repr(rep)


def test_init_leaves_outputs_exactly_unchanged():
    model = Net()
    x = torch.randn(3, 4, 12)
    y0 = model(x)
    randlora.inject(model, "all-linear", r=4)
    assert torch.equal(model(x), y0)


@pytest.mark.parametrize("path", ["weight", "activation", "auto"])
def test_forward_matches_float64_reference(path):
    model = Net().double()
    randlora.inject(model, TARGETS, r=4, alpha=12.0)
    randomize(model)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    for _, layer in adapted_layers(model):
        layer.set_path(path)
    blk = model.layers[0]
    for name in TARGETS:
        layer = getattr(blk, name)
        xin = torch.randn(5, layer.in_features, dtype=torch.float64)
        ref = reference_linear(xin, layer.weight, layer.bias, layer_delta(layer))
        torch.testing.assert_close(layer(xin), ref, rtol=1e-12, atol=1e-12)
    assert model(x).dtype == torch.float64


def test_full_rank_with_random_diagonals():
    model = Net(d=16, h=40)
    randlora.inject(model, TARGETS, r=3)
    randomize(model)
    for _, layer in adapted_layers(model):
        d = layer.delta_weight(torch.float64)
        assert torch.linalg.matrix_rank(d).item() == min(layer.out_features, layer.in_features)


def test_merge_unload_equals_unmerged_and_restores_modules():
    model = Net()
    originals = {n: m for n, m in model.named_modules()}
    keys = list(model.state_dict().keys())
    randlora.inject(model, TARGETS, r=4)
    randomize(model, 1)
    x = torch.randn(4, 12)
    y = model(x)
    randlora.merge(model)
    y_merged = model(x)
    assert ((y_merged - y).norm() / y.norm()).item() <= 1e-5  # relative error, fp32
    assert list(model.state_dict().keys()) == keys
    for n, m in model.named_modules():
        assert originals[n] is m
    assert not hasattr(model, randlora.walker.BANK_ATTR)


def test_merge_keep_wrappers_then_unmerge():
    model = Net().double()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    randlora.inject(model, TARGETS, r=4)
    randomize(model, 2)
    x = torch.randn(4, 12, dtype=torch.float64)
    y = model(x)
    randlora.merge(model, unload=False)
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)
    with pytest.raises(randlora.StateError, match="already merged"):
        randlora.merge(model)
    randlora.unmerge(model)
    for k, v in model.state_dict().items():
        if k in w0:
            torch.testing.assert_close(v, w0[k], rtol=1e-12, atol=1e-12)
    with pytest.raises(randlora.StateError, match="not merged"):
        randlora.unmerge(model)


def test_eject_restores_bit_for_bit():
    model = Net()
    before = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    randlora.inject(model, TARGETS, r=4)
    randomize(model)
    randlora.eject(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(randlora.StateError, match="no RandLora adapter"):
        randlora.eject(model)


def test_disabled_context():
    model = Net()
    x = torch.randn(3, 12)
    y0 = model(x)
    randlora.inject(model, TARGETS, r=4)
    randomize(model)
    y1 = model(x)
    with randlora.disabled(model):
        torch.testing.assert_close(model(x), y0)
    torch.testing.assert_close(model(x), y1)
    assert not torch.allclose(y1, y0)
    with pytest.raises(randlora.StateError):
        with randlora.disabled(Net()):
            pass


def test_state_dict_round_trip_and_bases_once():
    model = Net()
    randlora.inject(model, TARGETS, r=4)
    randomize(model, 3)
    sd = randlora.state_dict(model)
    assert sum(k.endswith("randlora_A") for k in sd) == 1 and sum(k.endswith("randlora_B") for k in sd) == 1
    assert "randlora_fingerprint" in sd
    sd_small = randlora.state_dict(model, save_projection=False)
    assert "randlora_A" not in sd_small and "randlora_B" not in sd_small
    fresh = Net()
    fresh.load_state_dict(model.state_dict(), strict=False)
    randlora.inject(fresh, TARGETS, r=4)
    randlora.load_state_dict(fresh, {k: v.clone() for k, v in sd_small.items()})
    for k, v in randlora.state_dict(fresh, save_projection=False).items():
        assert torch.equal(v, sd_small[k]), k
    x = torch.randn(2, 12)
    assert torch.equal(fresh(x), model(x))


def test_fingerprint_mismatch_refused_without_bases():
    model = Net()
    randlora.inject(model, TARGETS, r=4, seed=1)
    sd = randlora.state_dict(model, save_projection=False)
    other = Net()
    randlora.inject(other, TARGETS, r=4, seed=2)
    before = {k: v.clone() for k, v in randlora.state_dict(other, save_projection=False).items()}
    with pytest.raises(randlora.FingerprintMismatch, match="seed"):
        randlora.load_state_dict(other, sd)
    for k, v in randlora.state_dict(other, save_projection=False).items():
        assert torch.equal(v, before[k])
    # with the bases the mismatch in seed is still refused (a different model), not silently loaded
    with pytest.raises(randlora.FingerprintMismatch):
        randlora.load_state_dict(other, randlora.state_dict(model))


def test_missing_and_wrong_shape_keys_listed_together():
    model = Net()
    randlora.inject(model, TARGETS, r=4)
    sd = dict(randlora.state_dict(model, save_projection=False))
    del sd["layers.0.q_proj.randlora_lambda"]
    sd["layers.1.q_proj.randlora_gamma"] = torch.zeros(1, 1)
    sd["layers.9.q_proj.randlora_gamma"] = torch.zeros(1, 1)
    with pytest.raises(randlora.CheckpointError) as e:
        randlora.load_state_dict(model, sd)
    msg = str(e.value)
    assert "missing" in msg and "unexpected" in msg and "shape" in msg


def test_bank_is_one_copy_after_dtype_and_device_moves():
    model = Net()
    randlora.inject(model, "all-linear", r=4)
    for convert in (lambda m: m.to(torch.float64), lambda m: m.half(), lambda m: m.to("cpu"), lambda m: m.float()):
        convert(model)
        bank = model.randlora_bank
        ptr_a, ptr_b = bank.A.untyped_storage().data_ptr(), bank.B.untyped_storage().data_ptr()
        for _, layer in adapted_layers(model):
            A, B = layer.views()
            assert A.untyped_storage().data_ptr() == ptr_a and B.untyped_storage().data_ptr() == ptr_b
            assert A.dtype == layer.weight.dtype
        # the layers register no copies of the bases
        assert not any("randlora_A" in k or "randlora_B" in k for k in model.state_dict())
        buffers = [b for b in model.buffers()]
        assert len(buffers) == 2


def test_training_lowers_loss():
    torch.manual_seed(0)
    model = Net()
    target = Net()
    randlora.inject(model, TARGETS, r=4, alpha=8.0)
    opt = torch.optim.AdamW(randlora.trainable_parameters(model), lr=3e-2)
    x = torch.randn(64, 12)
    with torch.no_grad():
        y = target(x)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_dropout_only_on_adapter_input():
    torch.manual_seed(0)
    model = Net()
    randlora.inject(model, ["q_proj"], r=4, dropout=0.5)
    randomize(model)
    layer = model.layers[0].q_proj
    x = torch.randn(6, 12)
    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    xd = torch.nn.functional.dropout(x.double(), 0.5, training=True)
    ref = x.double() @ layer.weight.double().t() + layer.bias.double() + xd @ layer_delta(layer).t()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    layer.eval()
    ref_eval = reference_linear(x, layer.weight, layer.bias, layer_delta(layer))
    torch.testing.assert_close(layer(x).double(), ref_eval, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(O=st.integers(1, 24), I=st.integers(1, 24), r_frac=st.floats(0.0, 1.0), lead=st.lists(st.integers(1, 3), max_size=2),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_any_shape_matches_reference(O, I, r_frac, lead, bias, dtype):
    r = 1 + round(r_frac * (max(O, I) - 1))  # any r up to the largest side (r > min(O, I) included)
    model = nn.Sequential(nn.Linear(I, O, bias=bias).to(dtype), nn.Identity())
    randlora.inject(model, ["0"], r=r)
    randomize(model)
    layer = model[0]
    assert layer.randlora_lambda.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.randn(*lead, I, dtype=dtype)
    y = model(x)
    assert y.shape == (*lead, O) and y.dtype == dtype
    ref = reference_linear(x, layer.weight, layer.bias, layer_delta(layer))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16])
def test_half_weights_keep_float32_adapter_and_input_dtype(wdtype):
    model = nn.Sequential(nn.Linear(16, 8).to(wdtype))
    randlora.inject(model, ["0"], r=4)
    layer = model[0]
    assert layer.randlora_lambda.dtype == torch.float32
    x = torch.randn(3, 16, dtype=wdtype)
    y = model(x)
    assert y.dtype == wdtype
    y.float().sum().backward()
    assert layer.randlora_lambda.grad.dtype == torch.float32


def test_summary_and_report():
    model = Net()
    randlora.inject(model, TARGETS, r=4)
    s = randlora.summary(model)
    assert "layers.1.down_proj" in s and "%" in s
    with pytest.raises(randlora.StateError):
        randlora.summary(Net())


def test_save_load_file_round_trip(tmp_path):
    model = Net()
    randlora.inject(model, TARGETS, r=4, seed=7)
    randomize(model, 4)
    x = torch.randn(3, 12)
    y = model(x)
    for proj in (True, False):
        path = randlora.save(model, tmp_path / f"a{proj}.safetensors", save_projection=proj)
        plain = Net()
        plain.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
        randlora.load(plain, path)
        assert torch.equal(plain(x), y)
        assert plain.randlora_bank.seed == 7
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_api_rejects_non_modules():
    for fn in (randlora.merge, randlora.eject, randlora.unmerge, randlora.summary, randlora.state_dict,
               randlora.trainable_parameters):
        with pytest.raises(randlora.RandLoraError, match="nn.Module"):
            fn("not a model")
    with pytest.raises(randlora.RandLoraError, match="nn.Module"):
        randlora.inject([1, 2], ["q"])


@pytest.mark.parametrize("init, scale, gamma", [("sqrt", 1.0, lambda k: k ** -0.5), ("peft", 6.0, lambda k: 1 / k)])
def test_init_sets_the_start_and_default_alpha_and_is_saved(tmp_path, init, scale, gamma):
    model = Net()
    x = torch.randn(3, 12)
    y0 = model(x)
    randlora.inject(model, TARGETS, r=4, init=init)
    assert torch.equal(model(x), y0)  # λ = 0 either way
    for _, layer in adapted_layers(model):
        assert layer.init == init and layer.scaling == scale
        assert torch.equal(layer.randlora_gamma, torch.full_like(layer.randlora_gamma, gamma(max(layer.n, layer.m))))
    randomize(model, 4)
    y = model(x)
    path = randlora.save(model, tmp_path / "a.safetensors", save_projection=False)
    plain = Net()
    plain.load_state_dict(model.state_dict(), strict=False)  # the same base weights
    randlora.load(plain, path)
    assert torch.equal(plain(x), y) and randlora.walker.config_of(plain).init == init
    for _, layer in adapted_layers(plain):
        layer.reset_parameters()
        assert layer.init == init
        assert torch.equal(layer.randlora_gamma, torch.full_like(layer.randlora_gamma, gamma(max(layer.n, layer.m))))


def test_file_without_init_setting_loads_as_peft_init(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model = Net()
    randlora.inject(model, TARGETS, r=4, init="peft")
    randomize(model, 4)
    path = randlora.save(model, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    del cfg["init"]  # as written before the setting existed
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=dict(meta, config=json.dumps(cfg)))
    plain = Net()
    plain.load_state_dict(model.state_dict(), strict=False)
    randlora.load(plain, tmp_path / "old.safetensors")
    x = torch.randn(3, 12)
    assert torch.equal(plain(x), model(x)) and randlora.walker.config_of(plain).init == "peft"
    assert all(layer.init == "peft" for _, layer in adapted_layers(plain))


@pytest.mark.parametrize("bases", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_state_dict_with_bases_loads_back(bases, dtype):
    """A bf16/fp16 model's state dict carries its bank's rounded bases, which no float32 checksum names: they are
    checked against the model's own bank instead, and a changed entry is still refused as corrupt."""
    base = Net().to(dtype)
    model = copy.deepcopy(base)
    randlora.inject(model, TARGETS, r=4, bases=bases)
    randomize(model, 2)
    sd = randlora.state_dict(model, save_projection=True)
    assert sd["randlora_A"].dtype == dtype
    fresh = copy.deepcopy(base)
    randlora.inject(fresh, TARGETS, r=4, bases=bases)
    randlora.load_state_dict(fresh, sd)
    x = torch.randn(3, 12, dtype=dtype)
    assert torch.equal(model(x), fresh(x))
    bad = dict(sd, randlora_A=sd["randlora_A"].clone())
    bad["randlora_A"][0, 0] += 1
    with pytest.raises(randlora.CheckpointError, match="corrupt"):
        randlora.load_state_dict(fresh, bad)
