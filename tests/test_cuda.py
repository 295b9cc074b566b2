"""The op and the layer on a CUDA device: every route and dtype against the float64 reference, the bank placed
once, no host-device synchronisation in a training step, compile, and a 4-bit base. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import randlora
from randlora import ops
from reference import layer_delta, reference_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROUTES = ("auto", "weight", "activation")
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _model(dtype=torch.float32, O=96, I=64, r=8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(I, O), nn.Tanh(), nn.Linear(O, I)).to("cuda", dtype)
    randlora.inject(model, ["0", "2"], r=r)
    with torch.no_grad():
        for _, layer in randlora.walker.adapted_layers(model):
            layer.randlora_lambda.normal_(0, 0.05)
            layer.randlora_gamma.uniform_(0.5, 1.5)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("T", [8, 96, 512])
def test_every_route_and_dtype_matches_the_float64_reference(dtype, route, T):
    model = _model(dtype)
    layer = model[0]
    layer.set_path(route)
    x = torch.randn(T, 64, device="cuda", dtype=dtype, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    xr = x.detach().double().requires_grad_()
    ref = reference_linear(xr, layer.weight.detach().double(), layer.bias.detach().double(), layer_delta(layer))
    assert _rel(y, ref) < TOL[dtype]
    ref.backward(gy.double())
    assert _rel(x.grad, xr.grad) < TOL[dtype]
    assert layer.randlora_lambda.grad is not None and torch.isfinite(layer.randlora_lambda.grad).all()


@pytest.mark.parametrize("route", ROUTES)
def test_autocast_bf16(route):
    model = _model(torch.float32)
    layer = model[0]
    layer.set_path(route)
    x = torch.randn(256, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = reference_linear(x, layer.weight, layer.bias, layer_delta(layer))
    assert _rel(y, ref) < TOL[torch.bfloat16]


def test_bank_lives_once_on_the_device_and_scratch_buffers_stay_on_the_cpu():
    model = _model()
    bank = model.randlora_bank
    assert bank.A.is_cuda and bank.B.is_cuda
    A0, B0 = model[0].views()
    A2, B2 = model[2].views()
    assert A0.untyped_storage().data_ptr() == A2.untyped_storage().data_ptr() == bank.A.untyped_storage().data_ptr()
    ops.release_workspace()
    model(torch.randn(32, 64, device="cuda")).sum().backward()
    assert all(not t.is_cuda for t in ops.workspace().values())  # the CPU-only scratch buffers never hold CUDA tensors


@pytest.mark.parametrize("T", [16, 512])
def test_a_training_step_does_not_synchronise_with_the_host(T):
    model = _model()
    opt = torch.optim.AdamW(randlora.trainable_parameters(model), lr=1e-3, fused=True)
    x = torch.randn(T, 64, device="cuda")
    model(x).square().mean().backward()  # warm-up outside the check (allocator, kernels)
    opt.step()
    opt.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            model(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_compile_matches_eager():
    model = _model()
    x = torch.randn(128, 64, device="cuda")
    eager = model(x)
    compiled = torch.compile(model)(x)
    assert _rel(compiled, eager) < 1e-5


def test_cached_and_merge_on_the_device():
    model = _model()
    model.eval()
    x = torch.randn(64, 64, device="cuda")
    with torch.no_grad():
        plain = model(x)
        with randlora.cached(model):
            hit = model(x)
        assert _rel(hit, plain) < 1e-5
        randlora.merge(model)
        assert _rel(model(x), plain) < 1e-5


def test_a_4bit_base_on_the_device():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    q = bnb.nn.Linear4bit(64, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(lin.bias.data.clone())
    model = nn.Sequential(q).to("cuda")
    randlora.inject(model, ["0"], r=8)
    with torch.no_grad():
        model[0].randlora_lambda.normal_(0, 0.05)
    x = torch.randn(32, 64, device="cuda")
    y = model(x)
    base = model[0].base_layer(x)
    delta = layer_delta(model[0]).to("cuda")
    assert _rel(y - base, x.double() @ delta.t()) < 1e-4
    y.sum().backward()
    assert model[0].randlora_gamma.grad is not None
