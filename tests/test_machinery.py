"""PyTorch machinery around an adapted model: torch.compile, activation checkpointing, autocast and
low-precision weights, and meta-device initialisation."""

from __future__ import annotations

import copy
import os
import shutil
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import randlora
from randlora.walker import adapted_layers
from reference import reference_delta


class Block(nn.Module):
    def __init__(self, d: int, h: int, p: float = 0.0) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return x + self.drop(self.down_proj(torch.tanh(self.up_proj(x + self.q_proj(x)))))


class Net(nn.Module):
    def __init__(self, d: int = 12, h: int = 20, n_layers: int = 2, out: int = 5, p: float = 0.0,
                 ckpt: dict | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(d, h, p) for _ in range(n_layers)])
        self.lm_head = nn.Linear(d, out)
        self.ckpt = ckpt  # kwargs of torch.utils.checkpoint.checkpoint, or None

    def forward(self, x):
        for blk in self.layers:
            x = blk(x) if self.ckpt is None else checkpoint(blk, x, **self.ckpt)
        return self.lm_head(x)


TARGETS = ["q_proj", "up_proj", "down_proj"]


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random λ ~ N(0, 1/s²), γ ~ N(0, 1/m²): a full-rank ``s·ΔW`` with entries of order ``1/sqrt(m)``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.randlora_lambda.copy_(torch.randn(layer.randlora_lambda.shape, generator=g) / layer.scaling)
            layer.randlora_gamma.copy_(torch.randn(layer.randlora_gamma.shape, generator=g) / layer.m)


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_grads(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=False)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")),
                    reason="torch.compile's default backend (inductor) needs a C++ compiler on the CPU")
def test_compiled_model_matches_eager_forward_and_backward(fresh_dynamo):
    torch.manual_seed(0)
    model = Net(d=16, h=24)
    randlora.inject(model, TARGETS, r=4)
    randomize(model)
    compiled = torch.compile(copy.deepcopy(model))  # default backend (inductor)
    x = torch.randn(3, 7, 16)
    for m in (model, compiled):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.square().sum().backward()
        m.out, m.gx = y.detach(), xi.grad
    torch.testing.assert_close(compiled.out, model.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.gx, model.gx, rtol=1e-5, atol=1e-5)
    # λ/γ gradients are long reductions with cancellation: compared normwise, to 1e-5 of each tensor's size
    ga, gb = adapter_grads(compiled._orig_mod), adapter_grads(model)
    assert ga.keys() == gb.keys() and len(ga) == 12
    for k in ga:
        assert (ga[k] - gb[k]).abs().max() <= 1e-5 * gb[k].abs().max(), k
    with torch.no_grad():  # the inference path compiles too
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["weight", "activation", "fan_in_fan_out", "dropout", "named", "no_grad"])
def test_one_adapted_layer_compiles_without_graph_breaks(case, fresh_dynamo):
    torch.manual_seed(0)
    if case == "fan_in_fan_out":
        class Conv1D(nn.Module):  # GPT-2 layout, detected by class name
            def __init__(self):
                super().__init__()
                self.weight = nn.Parameter(torch.randn(12, 20))
                self.bias = nn.Parameter(torch.randn(20))

        holder = nn.Module()
        holder.c_fc = Conv1D()
    else:
        holder = nn.Module()
        holder.c_fc = nn.Linear(12, 20)
    randlora.inject(holder, ["c_fc"], r=4, dropout=0.25 if case == "dropout" else 0.0)
    if case == "named":
        randlora.inject(holder, ["c_fc"], r=4, name="b", alpha=3.0)
        randlora.use(holder, "b")
    layer = holder.c_fc
    if case in ("weight", "activation"):
        layer.set_path(case)
    layer.train(case == "dropout")
    with torch.no_grad():
        for p in randlora.trainable_parameters(holder):
            p.normal_()
    x = torch.randn(6, 12, requires_grad=case != "no_grad")
    # fullgraph=True raises on any graph break; aot_eager also traces the autograd op's backward
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(case != "no_grad"):
        torch.manual_seed(1)
        y = compiled(x)
        torch.manual_seed(1)
        y_eager = layer(x)
    if case != "dropout":  # dropout masks differ between the compiled and eager RNG streams
        torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    if case != "no_grad":
        y.sum().backward()
        assert all(p.grad is not None for p in randlora.trainable_parameters(holder)
                   if p is layer.adapter().randlora_lambda or p is layer.adapter().randlora_gamma)


# ------------------------------------------------------------------------------------------------
# activation checkpointing
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpoint_gives_the_same_gradients_with_dropout(reentrant):
    torch.manual_seed(0)
    plain = Net(p=0.2)
    randlora.inject(plain, TARGETS, r=4, dropout=0.3)
    randomize(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.ckpt = {"use_reentrant": reentrant}
    x = torch.randn(4, 6, 12)
    grads = []
    for m in (plain, ckpt):
        m.train()
        torch.manual_seed(7)  # same dropout masks; checkpoint replays the RNG state when recomputing
        xi = x.clone().requires_grad_(reentrant)  # reentrant checkpoint needs an input that requires grad
        m(xi).square().mean().backward()
        grads.append(adapter_grads(m))
    assert len(grads[0]) == 12
    assert_same_grads(grads[1], grads[0], rtol=1e-6, atol=1e-7)
    torch.manual_seed(8)
    other = copy.deepcopy(plain)
    other.zero_grad()
    other(x).square().mean().backward()  # other masks: other gradients (dropout really is on)
    assert not torch.allclose(other.layers[0].q_proj.randlora_gamma.grad, grads[0]["layers.0.q_proj.randlora_gamma"])


def test_transformers_gradient_checkpointing_gives_the_same_gradients():
    tf = pytest.importorskip("transformers", reason="needs transformers")
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         attention_dropout=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg)
    randlora.inject(model, ["q_proj", "v_proj", "down_proj"], r=4, dropout=0.3)
    randomize(model)
    ids = torch.randint(3, 64, (2, 8))
    enables = [e for e in ("gradient_checkpointing_enable", "activation_checkpointing_enable") if hasattr(model, e)]
    assert "gradient_checkpointing_enable" in enables
    results = {}
    for how in [None] + enables:
        m = copy.deepcopy(model)
        if how is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # 5.x renames it activation_checkpointing_enable
                getattr(m, how)()
        m.train()
        torch.manual_seed(5)
        m(input_ids=ids, labels=ids).loss.backward()
        results[how] = adapter_grads(m)
    assert len(results[None]) == 12
    for how in enables:
        assert_same_grads(results[how], results[None], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# autocast and low-precision weights
# ------------------------------------------------------------------------------------------------
def _ref_and_scale(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference output, and the size of the terms summed into each output entry:
    ``|x|·(|W| + s·Σ|B_i||diag λ_i||A||diag γ_i|)ᵀ + |b|`` (what rounding errors are relative to)."""
    bank = layer.bank
    lam, gam = (t.detach().double() for t in (layer.adapter().randlora_lambda, layer.adapter().randlora_gamma))
    O, I, s = layer.out_features, layer.in_features, layer.scaling
    W = layer.weight_matrix().detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(O, dtype=torch.float64)
    d = reference_delta(lam, gam, bank.A, bank.B, O, I, s)
    dabs = reference_delta(lam.abs(), gam.abs(), bank.A.abs(), bank.B.abs(), O, I, abs(s))
    xd = x.detach().double()
    return xd @ (W + d).t() + b, xd.abs() @ (W.abs() + dabs).t() + b.abs()


# unit roundoff of each low-precision format
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.mark.parametrize("path", ["weight", "activation"])
def test_bf16_autocast_keeps_dtypes_and_error_is_bounded(path):
    torch.manual_seed(0)
    model = Net(d=48, h=64)
    randlora.inject(model, TARGETS, r=4)
    randomize(model)
    layer = model.layers[0].up_proj
    layer.set_path(path)
    x = torch.randn(10, 48)
    ref, scale = _ref_and_scale(layer, x)
    lin = nn.Linear(48, 64)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            y_lin = lin(x)
        assert y.dtype == y_lin.dtype == torch.bfloat16  # the same output dtype as a plain nn.Linear
        # bound: x, W + s·ΔW's pieces and the output are each rounded to bf16 (unit u = 2^-8); error is at
        # most 4u relative to the sum of the absolute terms (observed about 0.75u)
        err = ((y.double() - ref).abs() / scale).max().item()
        assert err <= 4 * UNIT[torch.bfloat16], err
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(3, 48))
    out.float().square().sum().backward()
    for p in randlora.trainable_parameters(model):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_keep_dtypes_and_error_is_bounded(dtype):
    torch.manual_seed(0)
    model = Net(d=48, h=64)
    randlora.inject(model, TARGETS, r=4)
    randomize(model)
    model.to(dtype)
    assert model.randlora_A.dtype == dtype and model.layers[0].q_proj.randlora_lambda.dtype == dtype
    layer = model.layers[0].up_proj
    x = torch.randn(10, 48).to(dtype)
    ref, scale = _ref_and_scale(layer, x)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            y = layer(x)
        assert y.dtype == dtype
        err = ((y.double() - ref).abs() / scale).max().item()
        assert err <= 4 * UNIT[dtype], err  # same bound as under autocast (observed about 0.75u)
    y = model(x)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    for p in randlora.trainable_parameters(model):
        assert p.grad.dtype == dtype and torch.isfinite(p.grad).all()
    sd = randlora.state_dict(model, save_projection=False)
    assert sd["layers.0.q_proj.randlora_lambda"].dtype == dtype


# ------------------------------------------------------------------------------------------------
# meta-device initialisation
# ------------------------------------------------------------------------------------------------
def test_meta_device_model_then_to_empty_and_load(tmp_path):
    torch.manual_seed(0)
    donor = Net()
    randlora.inject(donor, TARGETS, r=4, seed=11)
    randomize(donor)
    adapter = randlora.save(donor, tmp_path / "a.safetensors", save_projection=False)
    base_sd = {k: v for k, v in donor.state_dict().items() if "randlora" not in k}

    with torch.device("meta"):
        model = Net()
    randlora.inject(model, TARGETS, r=4, seed=11)
    assert model.randlora_A.is_meta and model.layers[0].q_proj.randlora_lambda.is_meta
    model.to_empty(device="cpu")
    # the bank refills itself from the seed; the adapter starts at its initial state, not garbage
    bank, donor_bank = randlora.walker.bank_of(model), randlora.walker.bank_of(donor)
    torch.testing.assert_close(bank.A, donor_bank.A, rtol=0, atol=0)
    torch.testing.assert_close(bank.B, donor_bank.B, rtol=0, atol=0)
    for _, layer in adapted_layers(model):
        assert torch.equal(layer.randlora_lambda, torch.zeros_like(layer.randlora_lambda))
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert not unexpected and all("randlora" in k for k in missing)
    randlora.load(model, adapter)
    x = torch.randn(3, 12)
    torch.testing.assert_close(model(x), donor(x), rtol=0, atol=0)


def test_meta_device_llama_then_to_empty_and_load(tmp_path):
    tf = pytest.importorskip("transformers", reason="needs transformers")
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    donor = tf.LlamaForCausalLM(cfg)
    base_sd = copy.deepcopy(donor.state_dict())
    randlora.inject(donor, ["q_proj", "v_proj"], r=4)
    randomize(donor)
    adapter = randlora.save(donor, tmp_path / "a.safetensors", save_projection=False)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    randlora.inject(model, ["q_proj", "v_proj"], r=4)
    model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert not unexpected and missing and all("randlora" in k for k in missing)
    # transformers' own non-persistent buffers (rotary inv_freq) are not in the state dict: copy them
    theirs = dict(donor.named_buffers())
    with torch.no_grad():
        for n, b in model.named_buffers():
            if not n.startswith("randlora_"):
                b.copy_(theirs[n])
    randlora.load(model, adapter)
    ids = torch.randint(3, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, donor(input_ids=ids).logits, rtol=0, atol=0)
