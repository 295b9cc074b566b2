"""``nn.MultiheadAttention.in_proj_weight`` as an adapted weight (randlora/attention.py, ``RandLoraInProj``).

A target naming an attention module (or its ``in_proj``) adapts its ``(3·E) × E`` ``in_proj_weight``; the
attention module keeps the Parameter (the model's ``state_dict`` keys do not change) and computes with
``W + s·ΔW`` for each call, the fused fast paths included. Over the encoder layer (``batch_first`` both ways),
an encoder stack (nested tensors on), the decoder layer (self- and cross-attention), a bare attention module
(``need_weights``, a key padding mask and an attention mask) and a torchvision-ViT-style block, in train and
eval, with and without grad: the output equals a float64 reference that adds each layer's reference ``s·ΔW``
to a copy of its weight (``in_proj_weight`` for the in_proj), every adapted weight changes that reference and
every ``λ``/``γ`` gets the reference's gradient; ``gradcheck`` on a tiny attention module. Then merge (fast
paths again), eject, save/load, named adapters, delete, summary, the refusals, and ``"all-linear"``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import randlora
from randlora.attention import RandLoraInProj, guarded
from randlora.walker import adapted_layers

from models import randomize
from reference import reference_delta
from test_attention_modules import (CASES, D, H, S, Case, ViTBlock, _eval_run, _inputs, _kept, check_applied,
                                    fused)  # noqa: F401 (fused: a fixture)
from test_errors import assert_unchanged, snapshot

TARGETS = ["in_proj", "out_proj", "linear1"]  # every attention module's in_proj and out_proj, a linear layer


def _mha_masks(m, x, pad):
    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)  # an attention mask beside the padding mask
    return m(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=True)


INPROJ_CASES = {
    "encoder_layer-bf1": CASES["encoder_layer-bf1-nf0"],
    "encoder_layer-bf0": CASES["encoder_layer-bf0-nf1"],
    "encoder_stack": CASES["encoder_stack"],
    "decoder_layer": CASES["decoder_layer"],
    "mha-masks": Case(lambda: nn.MultiheadAttention(D, H, batch_first=True), _mha_masks),
    "vit_block": CASES["vit_block"],
}
MODES = [("train", True), ("train", False), ("eval", True), ("eval", False)]


def _adapted(name: str, targets=TARGETS, seed: int = 1):
    torch.manual_seed(0)
    base = INPROJ_CASES[name].build()
    model = copy.deepcopy(base)
    rep = randlora.inject(model, targets, r=2)
    randomize(model, seed)
    return base, model, rep


def _weight_key(layer, path: str) -> str:
    """The base model's key of the weight ``layer`` adapts (an in_proj: its attention module's)."""
    if isinstance(layer, RandLoraInProj):
        return f"{path.rpartition('.')[0]}.in_proj_weight".lstrip(".")
    return f"{path}.weight"


def _reference(base: nn.Module, model: nn.Module, x, pad, case, without: str | None = None):
    """``case.run`` on the float64 base model with ``W + s·ΔW`` (tests/reference.py) in every adapted weight but
    ``without``; returns the output and the leaf ``λ``/``γ`` by path."""
    plain = copy.deepcopy(base).double().train(model.training)
    weights = dict(plain.named_parameters())
    params, leaves = {}, {}
    for path, layer in adapted_layers(model):
        lam = layer.randlora_lambda.detach().double().requires_grad_()
        gam = layer.randlora_gamma.detach().double().requires_grad_()
        leaves[path] = (lam, gam)
        key = _weight_key(layer, path)
        W = weights[key].detach()
        if path != without:
            W = W + reference_delta(lam, gam, layer.bank.A, layer.bank.B, layer.out_features, layer.in_features,
                                    layer.scaling)
        params[key] = W
    return case.run(lambda *a, **kw: functional_call(plain, params, a, kw), x, pad), leaves


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("mode,grad", MODES)
@pytest.mark.parametrize("name", list(INPROJ_CASES))
def test_every_adapted_weight_is_applied(name, mode, grad):
    case = INPROJ_CASES[name]
    base, model, rep = _adapted(name)
    assert sum(k == "attention in_proj" for k in rep.kinds) == sum(isinstance(m, nn.MultiheadAttention)
                                                                    for m in base.modules()) > 0
    model.train(mode == "train")
    check_applied(base, model, case, grad, _reference)


def test_gradcheck_on_a_tiny_attention_module():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).double()
    randlora.inject(mha, ["in_proj"], r=2)
    randomize(mha, 3)
    layer = mha.in_proj
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    keys = ("in_proj.randlora_lambda", "in_proj.randlora_gamma")

    def f(lam, gam):
        return functional_call(mha, dict(zip(keys, (lam, gam))), (x, x, x), {"need_weights": False})[0]

    lam = layer.randlora_lambda.detach().clone().requires_grad_()
    gam = layer.randlora_gamma.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (lam, gam))


# ------------------------------------------------------------------------------------------------
# fast paths, merge, eject, files, named adapters
# ------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("name,fast", [("encoder_layer-bf1", {"_transformer_encoder_layer_fwd": 1}),
                                       ("encoder_stack", {"_transformer_encoder_layer_fwd": 2,
                                                          "_nested_tensor_from_mask": 1}),
                                       ("vit_block", {"_native_multi_head_attention": 1})])
def test_the_fast_paths_see_the_adapted_in_proj_and_come_back_after_merge(fused, name, fast):
    case = INPROJ_CASES[name]
    base, model, _ = _adapted(name, targets=["in_proj"])  # every attention module's in_proj alone
    assert {type(l) for _, l in adapted_layers(model)} == {RandLoraInProj}
    x, pad = _inputs()
    x = x.float()
    y0, calls = _eval_run(base, case, x, pad, fused)
    assert calls == fast
    y, calls = _eval_run(model, case, x, pad, fused)
    # the encoder layer's fused kernel and the nested tensors are off; nn.MultiheadAttention's own kernel still
    # runs, reading in_proj_weight = W + s·ΔW
    assert calls == {k: v for k, v in fast.items() if k == "_native_multi_head_attention"}
    ref, _ = _reference(base, model, x.double(), pad, case)
    torch.testing.assert_close(_kept(y, pad, case).double(), _kept(ref, pad, case), rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(model)
    randlora.merge(model)
    assert not any(guarded(m) for m in model.modules()) and "in_proj" not in dict(model.named_modules())
    y_merged, calls = _eval_run(model, case, x, pad, fused)
    assert calls == fast
    torch.testing.assert_close(_kept(y_merged, pad, case), _kept(y, pad, case), rtol=1e-5, atol=1e-5)
    randlora.eject(twin)
    y_ejected, calls = _eval_run(twin, case, x, pad, fused)
    assert calls == fast and torch.equal(y_ejected, y0)
    assert [type(m) for m in twin.modules()] == [type(m) for m in base.modules()]


def test_keys_unmerge_save_load_named_adapters_delete_and_summary(tmp_path):
    case = INPROJ_CASES["decoder_layer"]
    base, model, rep = _adapted("decoder_layer", targets=["self_attn", "multihead_attn"])
    assert rep.names == ["self_attn.in_proj", "multihead_attn.in_proj"]
    # the base model's keys stay; the adapter's keys are the in_proj's own
    extra = [k for k in model.state_dict() if k not in base.state_dict()]
    assert list(base.state_dict()) == [k for k in model.state_dict() if k in base.state_dict()]
    assert extra == [f"{a}.in_proj.randlora_{p}" for a in ("self_attn", "multihead_attn") for p in ("lambda", "gamma")]
    assert model.self_attn.in_proj_weight is base_param(model, "self_attn.in_proj_weight")
    x, pad = _inputs()
    x = x.float()
    y = case.run(model, x, pad)
    W = model.self_attn.in_proj_weight.detach().clone()
    randlora.merge(model, unload=False)
    torch.testing.assert_close(case.run(model, x, pad), y, rtol=1e-5, atol=1e-5)
    randlora.unmerge(model)
    torch.testing.assert_close(model.self_attn.in_proj_weight, W, rtol=0, atol=1e-6)
    randlora.save(model, tmp_path / "a.safetensors")
    fresh = copy.deepcopy(base)
    randlora.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(case.run(fresh, x, pad), case.run(model, x, pad))
    summary = randlora.summary(fresh)
    assert "self_attn.in_proj" in summary and "attention in_proj" in summary
    randlora.inject(fresh, ["multihead_attn"], r=2, name="b")  # a named adapter on one in_proj
    randomize(fresh, 5, name="b")
    randlora.use(fresh, "b")
    yb = case.run(fresh, x, pad)
    assert (yb - y).abs().max() > 1e-3
    randlora.delete(fresh, "default")
    assert [p for p, _ in adapted_layers(fresh)] == ["multihead_attn.in_proj"]
    assert "in_proj" not in fresh.self_attn._modules and not guarded(fresh.self_attn)
    torch.testing.assert_close(case.run(fresh, x, pad), yb, rtol=1e-5, atol=1e-5)
    randlora.delete(fresh, "b")
    assert torch.equal(case.run(fresh, x, pad), case.run(base, x, pad))
    assert [type(m) for m in fresh.modules()] == [type(m) for m in base.modules()]


def base_param(model: nn.Module, key: str) -> nn.Parameter:
    return dict(model.named_parameters())[key]


def test_all_linear_leaves_in_proj_alone():
    torch.manual_seed(0)
    model = ViTBlock()
    rep = randlora.inject(model, "all-linear", r=2)
    assert "self_attention.in_proj" not in rep.names and set(rep.kinds) == {"linear"}


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
def test_separate_q_k_v_weights_are_refused():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(D, H, kdim=4, vdim=6, batch_first=True)})
    before = snapshot(model)
    with pytest.raises(randlora.TargetError) as e:
        randlora.inject(model, ["attn"], r=2)
    msg = str(e.value)
    assert msg.startswith("target 'attn': this nn.MultiheadAttention has kdim=4, vdim=6 != embed_dim=8")
    assert "out_proj" in msg and len(msg) < 1500
    assert_unchanged(before, snapshot(model))
    assert randlora.inject(model, ["out_proj"], r=2).names == ["attn.out_proj"]  # its out_proj alone: fine


def test_dropout_and_per_row_adapters_on_in_proj_are_refused():
    torch.manual_seed(0)
    model = ViTBlock()
    randlora.inject(model, ["self_attention"], r=2, dropout=0.1)
    randomize(model, 1)
    x, _ = _inputs()
    before = snapshot(model)
    with pytest.raises(randlora.ConfigError, match=r"in_proj.*dropout=0.*exclude=\['in_proj'\]"):
        model(x.float())
    assert_unchanged(before, snapshot(model))
    randlora.eject(model)
    randlora.inject(model, ["self_attention"], r=2)
    randlora.inject(model, ["self_attention"], r=2, name="b")
    with pytest.raises(randlora.StateError, match="randlora.mixed.*in_proj.*randlora.use"):
        with randlora.mixed(model, ["default", "b", None]):
            model(x.float())
    assert model.self_attention.in_proj_weight is base_param(model, "self_attention.in_proj_weight")


@pytest.mark.parametrize("export", ["save_peft", "to_lora"])
def test_peft_formats_refuse_the_in_proj(export, tmp_path):
    torch.manual_seed(0)
    model = ViTBlock()
    randlora.inject(model, ["self_attention", "out_proj"], r=2)
    call = {"save_peft": lambda: randlora.save_peft(model, tmp_path / "p"), "to_lora": lambda: randlora.to_lora(model)}
    with pytest.raises(randlora.StateError) as e:
        call[export]()
    msg = str(e.value)
    assert msg.startswith(f"randlora.{export} cannot write the adapted layers self_attention.in_proj (attention "
                          "in_proj)") and "randlora.save" in msg and len(msg) < 1500
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("name", ["vit_block", "mha-calls-out_proj"])
def test_a_merged_model_inside_disabled_computes_the_base_model(name):
    """``randlora.disabled`` on a model merged with ``unload=False``: the attention module reads ``W − s·ΔW``
    (in_proj and out_proj), and an attention module that also calls its ``out_proj`` takes ``s·ΔW`` out once."""
    case = CASES[name]
    torch.manual_seed(0)
    base = case.build()
    model = copy.deepcopy(base)
    randlora.inject(model, ["in_proj", "out_proj"], r=2)
    randomize(model, 1)
    x, pad = _inputs()
    x = x.float()
    y = case.run(model, x, pad)
    randlora.merge(model, unload=False)
    with randlora.disabled(model):
        torch.testing.assert_close(case.run(model, x, pad), case.run(base, x, pad), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(case.run(model, x, pad), y, rtol=1e-5, atol=1e-5)
    assert all(l.merged and not l.disabled for _, l in adapted_layers(model))
