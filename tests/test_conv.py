"""Adapted convolutions (randlora/conv.py, ``RandLoraConv``): ``conv(x, W + s·ΔW)`` with the kernel read as its
``O × (I/groups·∏k)`` matrix and the base layer's stride, padding, padding mode, dilation and groups.

Checked against an independent float64 reference (the base conv, by ``torch.func.functional_call``, with
``W + s·ΔW`` from tests/reference.py reshaped to the kernel) for outputs and ``λ``/``γ`` gradients, by
``gradcheck`` on a tiny grouped conv and by ``hypothesis`` over dimensions, kernel sizes, strides, dilations,
groups and ranks; a tiny CNN trains (loss goes down, every adapted conv gets a gradient). Then merge (also into a
``channels_last`` kernel), unmerge, eject, save/load, named adapters, delete, summary, the command line's
``merge`` into a weight file with 4-D kernels, and the refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

import randlora
from randlora.__main__ import main
from randlora.conv import RandLoraConv
from randlora.export import export_file
from randlora.walker import adapted_layers

from models import randomize
from reference import reference_delta
from test_errors import assert_unchanged, snapshot

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _ref_delta(layer) -> torch.Tensor:
    return reference_delta(layer.randlora_lambda.detach(), layer.randlora_gamma.detach(), layer.bank.A,
                           layer.bank.B, layer.out_features, layer.in_features, layer.scaling)


def _check_against_reference(conv: nn.Module, x: torch.Tensor, r: int = 2, seed: int = 1) -> None:
    """Inject ``conv`` (float64), then compare output and ``λ``/``γ`` gradients with the reference; ``s·ΔW`` must
    move the output."""
    base = copy.deepcopy(conv).double()
    model = nn.Sequential(copy.deepcopy(base))
    randlora.inject(model, ["0"], r=r)
    randomize(model, seed)
    layer = model[0]
    assert isinstance(layer, RandLoraConv) and layer.weight is model[0].weight
    lam = layer.randlora_lambda.detach().clone().requires_grad_()
    gam = layer.randlora_gamma.detach().clone().requires_grad_()
    D = reference_delta(lam, gam, layer.bank.A, layer.bank.B, layer.out_features, layer.in_features, layer.scaling)
    W = base.weight.detach()
    ref = functional_call(base, {"weight": W + D.reshape(W.shape)}, (x,))
    y = model(x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    assert (ref - base(x)).abs().max() > 1e-3  # the update changes the output
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    for p, leaf in ((layer.randlora_lambda, lam), (layer.randlora_gamma, gam)):
        assert p.grad is not None and p.grad.abs().max() > 0
        torch.testing.assert_close(p.grad, leaf.grad, rtol=1e-8, atol=1e-10)


LAYERS = {
    "conv1d-stride-dilation": (lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=1), (2, 4, 11)),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
    "conv2d-circular-groups": (lambda: nn.Conv2d(4, 6, (3, 2), padding=1, padding_mode="circular", groups=2),
                               (2, 4, 5, 5)),
    "conv2d-depthwise-nobias": (lambda: nn.Conv2d(4, 8, 3, groups=4, bias=False, stride=2), (2, 4, 7, 7)),
    "conv2d-replicate-wide": (lambda: nn.Conv2d(16, 2, 1, padding=1, padding_mode="replicate"), (1, 16, 3, 3)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (3, 2, 2), padding="same", padding_mode="reflect"), (1, 2, 4, 4, 4)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_adapted_conv_equals_the_float64_reference(name):
    build, shape = LAYERS[name]
    torch.manual_seed(0)
    _check_against_reference(build(), torch.randn(shape, dtype=torch.float64))


@settings(max_examples=20, deadline=None)
@given(dim=st.integers(1, 3), k=st.integers(1, 3), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       groups=st.sampled_from([1, 2]), width=st.integers(1, 3), r=st.integers(1, 4),
       mode=st.sampled_from(["zeros", "reflect", "circular"]))
def test_hypothesis_shapes(dim, k, stride, dilation, groups, width, r, mode):
    I, O = 2 * width, 2 * (4 - width)
    torch.manual_seed(0)
    conv = CONV[dim](I, O, k, stride=stride, dilation=dilation, groups=groups, padding=k // 2, padding_mode=mode)
    r = min(r, max(O, I // groups * k**dim))
    _check_against_reference(conv, torch.randn((2, I) + (5,) * dim, dtype=torch.float64), r=r)


def test_input_dropout_is_its_own_conv_in_training():
    """With dropout, training computes ``conv(x, W) + b + conv(dropout(x), s·ΔW)`` (the same mask as
    ``F.dropout`` draws from the same seed); eval ignores dropout."""
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=2).double()
    model = nn.Sequential(copy.deepcopy(base))
    randlora.inject(model, ["0"], r=2, dropout=0.5)
    randomize(model, 1)
    D = _ref_delta(model[0]).reshape(base.weight.shape)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.manual_seed(3)
    y = model(x)
    torch.manual_seed(3)
    xd = nn.functional.dropout(x, 0.5, training=True)
    ref = base(x) + functional_call(base, {"weight": D, "bias": None}, (xd,))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    y.sum().backward()
    assert model[0].randlora_lambda.grad.abs().max() > 0
    model.eval()
    torch.testing.assert_close(model(x), functional_call(base, {"weight": base.weight + D}, (x,)), rtol=1e-10,
                               atol=1e-10)


def test_gradcheck_on_a_tiny_grouped_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 2, groups=2, padding=1, padding_mode="reflect").double())
    randlora.inject(model, ["0"], r=2)
    randomize(model, 3)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    keys = ("0.randlora_lambda", "0.randlora_gamma")
    layer = model[0]
    lam = layer.randlora_lambda.detach().clone().requires_grad_()
    gam = layer.randlora_gamma.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: functional_call(model, dict(zip(keys, (a, b))), (x,)), (lam, gam))


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = y + self.block(y)
        return self.head(y.mean((2, 3)))


def test_a_tiny_cnn_learns():
    torch.manual_seed(0)
    model = TinyCNN()
    rep = randlora.inject(model, ["stem", "block.0", "block.2"], r=4, alpha=16.0)
    assert rep.kinds == ["Conv2d 3x3", "Conv2d 3x3/g2", "Conv2d 1x1"]
    x = torch.randn(16, 3, 6, 6)
    t = torch.randint(0, 4, (16,))
    opt = torch.optim.AdamW(randlora.trainable_parameters(model), lr=3e-2)
    losses = []
    for step in range(8):
        loss = nn.functional.cross_entropy(model(x), t)
        opt.zero_grad()
        loss.backward()
        for path, layer in adapted_layers(model):  # (γ's gradient is zero while λ = 0, at the start)
            assert layer.randlora_lambda.grad.abs().max() > 0, path
            assert step == 0 or layer.randlora_gamma.grad.abs().max() > 0, path
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# ------------------------------------------------------------------------------------------------
# lifecycle, files, refusals
# ------------------------------------------------------------------------------------------------
def _adapted_cnn(seed: int = 1):
    torch.manual_seed(0)
    base = TinyCNN()
    model = copy.deepcopy(base)
    randlora.inject(model, ["stem", "block.0"], r=2)
    randomize(model, seed)
    return base, model


def test_keys_merge_unmerge_eject_and_channels_last():
    base, model = _adapted_cnn()
    assert list(base.state_dict()) == [k for k in model.state_dict() if k in base.state_dict()]
    x = torch.randn(2, 3, 5, 5)
    y = model(x)
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert not twin.stem.weight.is_contiguous()
    W = model.stem.weight.detach().clone()
    randlora.merge(model, unload=False)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    with randlora.disabled(model):  # a merged, disabled layer is the base layer
        torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-5)
    randlora.unmerge(model)
    torch.testing.assert_close(model.stem.weight, W, rtol=0, atol=1e-6)
    randlora.merge(twin)  # writes through the non-contiguous kernel, then unloads
    assert type(twin.stem) is nn.Conv2d and not twin.stem.weight.is_contiguous()
    torch.testing.assert_close(twin(x), y, rtol=1e-5, atol=1e-5)
    randlora.eject(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)


def test_save_load_named_adapters_delete_and_summary(tmp_path):
    base, model = _adapted_cnn()
    x = torch.randn(2, 3, 5, 5)
    randlora.save(model, tmp_path / "a.safetensors")
    fresh = copy.deepcopy(base)
    randlora.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh(x), model(x))
    assert "Conv2d 3x3/g2" in randlora.summary(fresh)
    randlora.inject(fresh, ["block.0"], r=2, name="b")
    randomize(fresh, 4, name="b")
    randlora.use(fresh, "b")
    yb = fresh(x)
    assert (yb - model(x)).abs().max() > 1e-3
    randlora.delete(fresh, "default")
    assert [p for p, _ in adapted_layers(fresh)] == ["block.0"] and type(fresh.stem) is nn.Conv2d
    torch.testing.assert_close(fresh(x), yb, rtol=1e-6, atol=1e-6)
    randlora.delete(fresh, "b")
    assert torch.equal(fresh(x), base(x))


def test_command_line_merge_into_a_weight_file_with_kernels(tmp_path):
    base, model = _adapted_cnn()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    randlora.save(model, tmp_path / "ad.safetensors")
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "ad.safetensors"),
                 "--out", str(tmp_path / "merged.safetensors")]) == 0
    merged = copy.deepcopy(base)
    merged.load_state_dict(load_file(str(tmp_path / "merged.safetensors")))
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)


def test_all_linear_leaves_convs_alone_and_transposed_convs_are_refused():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 4), nn.Conv1d(1, 1, 1), nn.Linear(4, 2))
    assert randlora.inject(cnn, "all-linear", r=2).names == ["2"]  # (the last linear layer is the output head)
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3))
    before = snapshot(model)
    with pytest.raises(randlora.TargetError, match=r"not linear layers.*: 0 \(ConvTranspose2d\).*nn.Conv1d/2d/3d"):
        randlora.inject(model, ["0"], r=2)
    assert_unchanged(before, snapshot(model))


def test_save_peft_refuses_convs(tmp_path):
    _, model = _adapted_cnn()
    with pytest.raises(randlora.StateError) as e:
        randlora.save_peft(model, tmp_path / "p")
    msg = str(e.value)
    assert msg.startswith("randlora.save_peft cannot write the adapted layers stem (Conv2d 3x3)") and len(msg) < 1500
    assert not (tmp_path / "p").exists()


class ConvNet(nn.Module):
    """Convolutions peft's conv LoRA can hold (groups 1, no dilation, zero padding), and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.mix = nn.Conv1d(8, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.mix(self.stem(x).flatten(2)).mean(-1))


def test_to_lora_writes_convolutions_peft_loads(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    base = ConvNet()
    model = copy.deepcopy(base)
    randlora.inject(model, ["stem", "mix", "head"], r=2)
    randomize(model, 1)
    exp = randlora.save_lora(model, tmp_path / "lora", rank="full")
    assert exp.layers["stem"].kernel == (8, 3, 3, 3) and exp.max_error < 1e-5
    sd = exp.state_dict()
    assert sd["base_model.model.stem.lora_A.weight"].shape == (8, 3, 3, 3)
    assert sd["base_model.model.stem.lora_B.weight"].shape == (8, 8, 1, 1)
    x = torch.randn(2, 3, 8, 8)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora"))
    torch.testing.assert_close(peft_model(x), model(x), rtol=1e-4, atol=1e-5)


def test_to_lora_refuses_what_peft_conv_lora_cannot_hold(tmp_path):
    _, model = _adapted_cnn()  # block.0 is grouped
    with pytest.raises(randlora.StateError) as e:
        randlora.to_lora(model)
    msg = str(e.value)
    assert msg.startswith("randlora.to_lora cannot write the adapted convolutions block.0 (groups=2)")
    assert "randlora.save" in msg and len(msg) < 1500
    base, model = _adapted_cnn()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    randlora.save(model, tmp_path / "ad.safetensors")
    with pytest.raises(randlora.CheckpointError, match="adapts convolutions .*'stem'.*randlora.save_lora"):
        export_file(tmp_path / "ad.safetensors", tmp_path / "base.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_per_row_adapters_on_convs_are_refused():
    _, model = _adapted_cnn()
    randlora.inject(model, ["stem"], r=2, name="b")
    with pytest.raises(randlora.StateError, match="randlora.mixed.*convolution.*randlora.use"):
        with randlora.mixed(model, ["default", "b"]):
            model(torch.randn(2, 3, 5, 5))
