"""Quantised bases: bitsandbytes 4-bit (nf4, fp4) and 8-bit layers adapted in place, on the CPU (and torchao
int8 weight-only, when torchao is installed).

A tiny transformers Llama (hidden 64, MLP 128, 2 blocks) has every linear layer but the output head replaced
by a bitsandbytes layer quantised from its float weights. The adapted model is compared with the float64
reference (tests/reference.py: ``dequantize(W) + s·ΔW`` in float64) and with its float32 twin (the dequantised
weights in plain ``nn.Linear`` layers, adapted by the library with the same ``λ``/``γ``). Tolerances, relative to
the largest entry:

- ``TOL_FLOAT32 = 1e-4``: float32 against the float64 reference; the float32 twin is held to the same bound.
- ``TOL_4BIT = 1e-6``: 4-bit outputs against the float32 twin. bitsandbytes' CPU forward computes with exactly
  the dequantised weight in float32 (measured: bit-equal).
- ``TOL_8BIT = 0.02``: 8-bit (LLM.int8, threshold 0) outputs. The base rounds each activation row to int8 and
  computes in float16, about 1/127 of a row's largest entry per product (measured 0.9% on the un-adapted model,
  which the test asserts is present and within the bound). The adapter's own term is exact in every case
  (``test_adapter_term_is_exact_per_layer``).
- λ/γ gradients: no further from the float64 twin's than the float32 twin's own (random full-size ``λ`` make
  them ill-conditioned, ~1e-3).

bitsandbytes' bf16 CPU kernel for eval-mode, no-grad calls (used on CPUs with AVX512-BF16) is switched off in
the models compared with a reference (``support_avx512bf16_for_cpu = False``): it rounds to bfloat16, which is
the base layer's behaviour, not the adapter's; ``test_packed_cpu_weight_dequantizes`` runs with it on.
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is an optional test dependency "
                                                 "(pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")

import randlora  # noqa: E402
from randlora.quantized import dequantize, is_quantized  # noqa: E402
from randlora.walker import adapted_layers  # noqa: E402

from models import randomize  # noqa: E402
from reference import layer_delta, reference_delta  # noqa: E402
from test_errors import assert_unchanged, snapshot  # noqa: E402

KINDS = ("nf4", "fp4", "int8")
VOCAB = 64
TOL_4BIT = 1e-6
TOL_FLOAT32 = 1e-4
TOL_8BIT = 0.02


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' notes (float16 casts, missing optional kernels)
        yield


def _float_llama(seed: int = 0) -> nn.Module:
    conf = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                                    max_position_embeddings=64, attention_bias=True, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(conf).eval()


def _quantized_linear(lin: nn.Linear, kind: str, fast_cpu_path: bool = False) -> nn.Module:
    bias = lin.bias is not None
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, compute_dtype=torch.float32,
                              quant_type=kind)
        q.support_avx512bf16_for_cpu = q.support_avx512bf16_for_cpu and fast_cpu_path
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")  # bitsandbytes quantises on the move to a device
    if kind == "int8":
        assert q.weight.dtype == torch.int8 and q.weight.SCB is not None
    else:
        assert q.weight.dtype == torch.uint8 and q.weight.quant_state is not None
        assert q.weight.quant_state.quant_type == kind
    return q.eval()


def _quantize(model: nn.Module, kind: str, only: str = "", fast_cpu_path: bool = False) -> nn.Module:
    """Every ``nn.Linear`` except ``lm_head`` (whose name contains ``only``) replaced by a bitsandbytes layer."""
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and name != "lm_head" and only in name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _quantized_linear(mod, kind, fast_cpu_path))
    return model


def _ids(seed: int = 1, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _adapted(kind: str, seed: int = 0, only: str = "") -> nn.Module:
    model = _quantize(_float_llama(), kind, only)
    randlora.inject(model, "all-linear", r=8, seed=seed)
    randomize(model, 3)
    return model


def _dequantized(model: nn.Module) -> nn.Module:
    """A copy of an un-adapted model with every bitsandbytes layer replaced by a float32 ``nn.Linear`` holding
    its dequantised weight and its bias."""
    ref = copy.deepcopy(model)
    for name, mod in list(ref.named_modules()):
        if is_quantized(mod):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(dequantize(mod))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, lin.eval())
    return ref


def _float64_reference(model: nn.Module) -> nn.Module:
    """A plain float64 model: every adapted layer ``nn.Linear(dequantize(W) + s·ΔW)`` with ``s·ΔW`` from the
    float64 reference, every other quantised layer its dequantised weights."""
    ref = copy.deepcopy(model)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, randlora.RandLoraLinear):
            base = mod.base_layer
            W = (dequantize(base).double() if mod.quantized else mod.weight_matrix().detach().double()) + layer_delta(mod)
            b = mod.bias
        elif is_quantized(mod):
            W, b = dequantize(mod).double(), mod.bias
        else:
            continue
        lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(W)
            if b is not None:
                lin.bias.copy_(b.double())
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, lin)
    for a in ("randlora_bank", *randlora.BasisBank.NAMES):
        if hasattr(ref, a):
            delattr(ref, a)
    return ref.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ------------------------------------------------------------------------------------------------
# recognition and injection
# ------------------------------------------------------------------------------------------------
def test_import_does_not_load_bitsandbytes() -> None:
    code = ("import sys, randlora; "
            "assert not {'bitsandbytes', 'torchao', 'peft', 'transformers'} & set(sys.modules), 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", KINDS)
def test_inject_keeps_the_quantized_layers(kind: str) -> None:
    model = _quantize(_float_llama(), kind)
    model(input_ids=_ids())  # bitsandbytes' lazy state (8-bit: scales move to the module state)
    bases = {n: m for n, m in model.named_modules() if is_quantized(m)}
    weights = {n: m.weight for n, m in bases.items()}
    keys = list(model.state_dict())
    rep = randlora.inject(model, "all-linear", r=8)
    assert sorted(rep.names) == sorted(bases) and len(bases) == 14
    for n, layer in adapted_layers(model):
        assert layer.quantized and layer.base_layer is bases[n]
        assert layer.weight is weights[n] and layer.base_layer.weight is weights[n]  # stays quantised, shared
        assert not layer.weight.is_floating_point()
        assert (layer.out_features, layer.in_features) == (bases[n].out_features, bases[n].in_features)
        assert layer.randlora_lambda.dtype == torch.float32
    assert model.randlora_bank.A.dtype == torch.float32
    # the model's keys are the quantised model's (with bitsandbytes' quantisation state), plus λ/γ
    assert [k for k in model.state_dict() if "randlora_" not in k] == keys
    assert not any(p.requires_grad for n, p in model.named_parameters() if "randlora_" not in n)


def test_plain_integer_weights_stay_refused() -> None:
    model = _float_llama()
    lin = model.model.layers[0].mlp.up_proj
    lin.weight = nn.Parameter(lin.weight.detach().round().to(torch.int8), requires_grad=False)
    assert not is_quantized(lin)
    before = snapshot(model)
    with pytest.raises(randlora.ConfigError, match="bitsandbytes 4-bit/8-bit"):
        randlora.inject(model, "all-linear", r=8)
    assert_unchanged(before, snapshot(model))


# ------------------------------------------------------------------------------------------------
# numerics against the float reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_term_is_exact_per_layer(kind: str) -> None:
    """``layer(x) - base_layer(x)`` is the float64 reference ``s · x ΔWᵀ`` (the base's own error cancels)."""
    model = _adapted(kind)
    g = torch.Generator().manual_seed(5)
    for _, layer in adapted_layers(model):
        x = torch.randn(3, 7, layer.in_features, generator=g)
        with torch.no_grad():
            got = layer(x) - layer.base_layer(x)
        want = x.double() @ layer_delta(layer).t()
        assert _rel(got, want) <= TOL_FLOAT32
        assert _rel(layer.delta_weight(), layer_delta(layer)) <= TOL_FLOAT32


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_equal_the_float_reference(kind: str) -> None:
    ids = _ids()
    plain = _quantize(_float_llama(), kind)
    base_err = _rel(_logits(plain, ids), _logits(_float64_reference(plain), ids))
    model = _adapted(kind)
    twin = _twin(plain, model)
    want = _logits(_float64_reference(model), ids)
    got = _logits(model, ids)
    assert _rel(_logits(plain, ids), want) > 1e-2  # the adapter matters
    assert _rel(_logits(twin, ids), want) <= TOL_FLOAT32  # the float32 library's own rounding
    if kind == "int8":
        assert 1e-4 < base_err <= TOL_8BIT  # the base's own activation rounding, present and bounded
        assert _rel(got, want) <= TOL_8BIT
        assert _rel(got, _logits(twin, ids)) <= TOL_8BIT
    else:
        assert base_err <= TOL_FLOAT32
        assert _rel(got, _logits(twin, ids)) <= TOL_4BIT
        assert _rel(got, want) <= TOL_FLOAT32


def _twin(plain: nn.Module, model: nn.Module) -> nn.Module:
    """The float32 twin of ``model``: ``plain``'s dequantised weights, adapted the same way, same λ/γ."""
    twin = _dequantized(plain)
    cfg = randlora.walker.config_of(model)
    randlora.inject(twin, "all-linear", r=cfg.r, seed=cfg.seed)
    randlora.load_state_dict(twin, randlora.state_dict(model))
    return twin


def _grads(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_equal_the_float_reference(kind: str) -> None:
    """λ/γ gradients against the float64 twin (the dequantised weights, the library's op in float64): no
    further from it than the float32 twin's own, which the random full-size λ make ill-conditioned (~1e-3)."""
    plain = _quantize(_float_llama(), kind)
    model = _adapted(kind)
    twin = _twin(plain, model)
    twin64 = copy.deepcopy(twin).double()
    ids = _ids(seed=2)
    got, want32, want = (_grads(m.train(), ids) for m in (model, twin, twin64))
    assert sorted(got) == sorted(want) and len(got) == 28  # λ and γ of 14 layers, nothing else
    assert all(want[k].abs().max() > 0 for k in want)
    err = max(_rel(got[k], want[k]) for k in got)
    err32 = max(_rel(want32[k], want[k]) for k in got)
    assert err32 <= 1e-2
    assert err <= 1.5 * err32 + 1e-6, (err, err32)
    if kind != "int8":  # the same values as the float32 twin, summed in another order
        assert max(_rel(got[k], want32[k]) for k in got) <= 10 * TOL_FLOAT32


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_loss_and_leaves_the_base_alone(kind: str) -> None:
    model = _adapted(kind)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.reset_parameters()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "randlora_" not in k}
    opt = torch.optim.AdamW(randlora.trainable_parameters(model), lr=3e-3)
    ids = _ids(seed=4, batch=4, seq=16)
    model.train()
    losses = []
    for _ in range(16):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    now = {k: v for k, v in model.state_dict().items() if "randlora_" not in k}
    assert now.keys() == frozen.keys() and all(torch.equal(now[k], frozen[k]) for k in frozen)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_keeps_no_dequantized_weight(kind: str) -> None:
    """What a training call saves for backward through autograd: the input itself, λ, γ and the bank's own
    storage, nothing of size ``O × I`` (bitsandbytes keeps its references to ``x`` and the packed weight on its
    ctx, outside autograd's saved tensors)."""
    torch.manual_seed(0)
    model = nn.Sequential(_quantized_linear(nn.Linear(96, 160), kind))
    randlora.inject(model, ["0"], r=16)
    model.train()
    layer, bank = model[0], model.randlora_bank
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.untyped_storage().data_ptr())
        return t

    x = torch.randn(40, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    allowed = {t.untyped_storage().data_ptr() for t in (x, layer.randlora_lambda, layer.randlora_gamma, bank.A, bank.B)}
    assert saved and set(saved) <= allowed
    y.sum().backward()
    assert x.grad is not None and layer.randlora_gamma.grad is not None


# ------------------------------------------------------------------------------------------------
# state: save/load, disabled, cached, eject
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_exact(kind: str, tmp_path) -> None:
    model = _adapted(kind, seed=11)
    path = tmp_path / "adapter.safetensors"
    randlora.save(model, path)
    fresh = _quantize(_float_llama(), kind)
    randlora.load(fresh, path)
    a, b = randlora.state_dict(model), randlora.state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(l.quantized for _, l in adapted_layers(fresh))
    ids = _ids()
    assert torch.equal(_logits(model, ids), _logits(fresh, ids))
    sd = randlora.state_dict(model)
    again = _quantize(_float_llama(), kind)
    randlora.inject(again, "all-linear", r=8, seed=11)
    randlora.load_state_dict(again, sd)
    assert torch.equal(_logits(model, ids), _logits(again, ids))


@pytest.mark.parametrize("kind", KINDS)
def test_disabled_and_cached(kind: str, monkeypatch) -> None:
    from randlora import core

    ids = _ids()
    plain = _quantize(_float_llama(), kind)
    want_base = _logits(plain, ids)
    model = _adapted(kind)
    adapted = _logits(model, ids)
    with randlora.disabled(model):
        assert torch.equal(_logits(model, ids), want_base)
    layers = [l for _, l in adapted_layers(model)]
    for frozen_base in (False, True):
        # no float W to add s·ΔW to: the layer keeps s·ΔW and a no-grad call is the quantised matmul plus one
        # dense matmul with it (instead of two through the bases), built once per block
        planned, real = [], core.call
        monkeypatch.setattr(core, "call", lambda *a, **k: planned.append(1) or real(*a, **k))
        with torch.no_grad(), randlora.cached(model, frozen_base=frozen_base):
            assert all(l.route(12, need_x=False).build == "cached" for l in layers)
            torch.testing.assert_close(_logits(model, ids), adapted, rtol=1e-5, atol=1e-5)
            first = _logits(model, ids)
            torch.testing.assert_close(first, adapted, rtol=1e-5, atol=1e-5)
            assert all(l.cache.builds == 1 for l in layers)
            # frozen_base: from the second call of the model on, each layer is its own forward plus one matmul
            assert len(planned) == len(layers) * (1 if frozen_base else 2)
            assert torch.equal(_logits(model, ids), first)
        monkeypatch.setattr(core, "call", real)
    with randlora.cached(model):  # training inside the block: the op's own routes, gradients as outside
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(l.route(1000).build is None for l in layers)
    assert all(l.randlora_lambda.grad is not None for l in layers)
    model.eval()
    with torch.no_grad():
        assert all(l.route(12, need_x=False).build is None for l in layers)  # outside: nothing kept


@pytest.mark.parametrize("kind", KINDS)
def test_eject_restores_the_bitsandbytes_modules(kind: str) -> None:
    model = _quantize(_float_llama(), kind)
    ids = _ids()
    model(input_ids=ids)  # bitsandbytes' lazy state settles before the snapshot
    before = snapshot(model)
    want = _logits(model, ids)
    randlora.inject(model, "all-linear", r=8)
    randomize(model, 1)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    randlora.eject(model)
    assert_unchanged(before, snapshot(model))
    assert torch.equal(_logits(model, ids), want)


def test_train_eval_reach_the_quantized_base() -> None:
    model = _adapted("nf4")
    model.train()
    assert all(l.base_layer.training for _, l in adapted_layers(model))
    model.eval()
    assert not any(l.base_layer.training for _, l in adapted_layers(model))


# ------------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_merge_is_refused_and_changes_nothing(kind: str) -> None:
    model = _adapted(kind)
    before = snapshot(model)
    with pytest.raises(randlora.StateError, match="dequantize=True") as info:
        randlora.merge(model)
    assert "model.layers.0.self_attn.q_proj" in str(info.value) and "python -m randlora merge" in str(info.value)
    with pytest.raises(randlora.ConfigError, match="unload=True"):
        randlora.merge(model, unload=False, dequantize=True)
    with pytest.raises(randlora.ConfigError, match="floating-point"):
        randlora.merge(model, dequantize=True, dtype=torch.int8)
    with pytest.raises(randlora.StateError, match="dequantize=True"):
        next(l for _, l in adapted_layers(model)).merge_()
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("kind,dtype", [("nf4", torch.float32), ("fp4", torch.bfloat16), ("int8", torch.float32),
                                        ("int8", torch.bfloat16)])
def test_merge_dequantize_gives_plain_linear_layers(kind: str, dtype: torch.dtype) -> None:
    ids = _ids()
    model = _adapted(kind)
    with torch.no_grad():  # an update of the weights' size, so that a bf16 rounding stays small in the logits
        for _, layer in adapted_layers(model):
            layer.randlora_lambda.mul_(0.05)
    want = _logits(model, ids)
    u32, u = torch.finfo(torch.float32).eps / 2, torch.finfo(dtype).eps / 2
    expected = {}
    for n, l in adapted_layers(model):
        W = dequantize(l.base_layer).double()
        lam, gam, bank = l.randlora_lambda.detach(), l.randlora_gamma.detach(), l.bank
        mag = reference_delta(lam.abs(), gam.abs(), bank.A.abs(), bank.B.abs(), l.out_features, l.in_features,
                              l.scaling)
        exact = W + layer_delta(l)
        # float32 sums of n·r terms (and the add to W), then one rounding to dtype
        bound = (l.n * l.r + 2) * u32 * (W.abs() + mag) + u * exact.abs()
        expected[n] = (exact, bound, l.bias)
    head = model.lm_head
    randlora.merge(model, dequantize=True, dtype=dtype)
    assert not hasattr(model, "randlora_bank") and model.lm_head is head
    assert not any(is_quantized(m) or isinstance(m, randlora.RandLoraLinear) for m in model.modules())
    for n, (exact, bound, b) in expected.items():
        lin = model.get_submodule(n)
        assert type(lin) is nn.Linear and lin.weight.dtype == dtype and not lin.weight.requires_grad
        assert ((lin.weight.double() - exact).abs() <= bound).all()
        if b is not None:
            assert torch.equal(lin.bias, b.to(dtype)) and lin.bias.dtype == dtype
    got = _logits(model.float(), ids)
    # int8: the merged model no longer rounds activations to int8; bf16: each weight rounded to 8 bits
    tol = TOL_8BIT if (kind == "int8" or dtype == torch.bfloat16) else TOL_FLOAT32
    assert _rel(got, want) <= tol


def test_merge_dequantize_on_a_mixed_model() -> None:
    """Attention quantised, MLP float: the float layers merge in place as usual, the others are replaced."""
    ids = _ids()
    model = _adapted("nf4", only="self_attn")
    kinds = {n: l.quantized for n, l in adapted_layers(model)}
    assert any(kinds.values()) and not all(kinds.values())
    float_objs = {n: l.base_layer for n, l in adapted_layers(model) if not l.quantized}
    want = _logits(model, ids)
    randlora.merge(model, dequantize=True)
    for n, q in kinds.items():
        m = model.get_submodule(n)
        assert type(m) is nn.Linear
        assert (m is float_objs[n]) if not q else n not in float_objs
    assert _rel(_logits(model, ids), want) <= TOL_FLOAT32


def test_merge_dequantize_safe_refuses_non_finite() -> None:
    model = _adapted("nf4")
    with torch.no_grad():
        next(l for _, l in adapted_layers(model)).randlora_lambda[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(randlora.StateError, match="non-finite"):
        randlora.merge(model, dequantize=True, safe=True)
    assert_unchanged(before, snapshot(model))


def test_packed_cpu_weight_dequantizes() -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at the first eval-mode, no-grad call; the
    dequantised weight read after that is bitsandbytes' own unpacking of it (its state_dict's inverse)."""
    model = _quantize(_float_llama(), "nf4", fast_cpu_path=True)
    layer0 = model.model.layers[0].mlp.up_proj
    if not layer0.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks")
    before = dequantize(layer0)
    randlora.inject(model, "all-linear", r=8)
    randomize(model, 2)
    ids = _ids()
    want = _logits(model, ids)  # repacks every 4-bit weight
    up = model.model.layers[0].mlp.up_proj
    assert up.base_layer.weight.quant_state.packing_format_for_cpu
    packed = up.base_layer.weight.data.clone()
    after = dequantize(up.base_layer)
    assert torch.equal(up.base_layer.weight.data, packed)  # read from copies, the layer is not changed
    # the inverse re-quantises the nested absmax scales: a small, bounded difference
    assert _rel(after, before) <= 1e-2
    randlora.merge(model, dequantize=True)
    # the packed kernel computes in bfloat16 (three significant digits), the merged model in float32
    assert _rel(_logits(model, ids), want) <= 2e-2


# ------------------------------------------------------------------------------------------------
# peft adapters trained on quantised bases
# ------------------------------------------------------------------------------------------------
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_peft_adapter_trained_on_a_quantized_base_loads(kind: str, tmp_path) -> None:
    peft = pytest.importorskip("peft", reason="peft is an optional test dependency")
    plain = _quantize(_float_llama(), kind)
    base = copy.deepcopy(plain)
    setattr(plain, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)  # what peft dispatches on
    pm = peft.get_peft_model(plain, peft.RandLoraConfig(r=8, target_modules=PEFT_TARGETS, randlora_alpha=16,
                                                        projection_prng_key=7, save_projection=False))
    wrapped = {type(m).__name__ for m in pm.modules() if type(m).__module__ == "peft.tuners.randlora.bnb"}
    assert wrapped == {"Linear8bitLt" if kind == "int8" else "Linear4bit"}  # peft's own bitsandbytes layers
    ids = _ids()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    pm.train()
    for _ in range(3):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    want = _logits(pm, ids)
    pm.save_pretrained(tmp_path / "peft")
    model = randlora.load_peft(base, tmp_path / "peft")
    assert all(l.quantized for _, l in adapted_layers(model)) and len(list(adapted_layers(model))) == 14
    got = _logits(model, ids)
    assert _rel(_logits(_quantize(_float_llama(), kind), ids), want) > 1e-2  # the adapter matters
    # the same base layers, the adapter term summed in another order; 8-bit: a last-bit difference can move an
    # activation across an int8 rounding boundary in the next layer, a jump of up to 1/127 of its row's scale
    tol = TOL_8BIT if kind == "int8" else TOL_FLOAT32
    assert _rel(got, want) <= tol
    # and back: our folder loads in peft on the quantised base, with the same outputs
    randlora.save_peft(model, tmp_path / "ours", save_projection=False)
    again = _quantize(_float_llama(), kind)
    setattr(again, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    pm2 = peft.PeftModel.from_pretrained(again, tmp_path / "ours").eval()
    assert _rel(_logits(pm2, ids), got) <= tol


# ------------------------------------------------------------------------------------------------
# torchao int8 weight-only: the same mechanism (the weight is a torchao tensor subclass)
# ------------------------------------------------------------------------------------------------
def _torchao_pair():
    """``(quantised, float twin)``: three linear layers, int8 weight-only by torchao, and the same with the
    dequantised weights."""
    torchao_q = pytest.importorskip("torchao.quantization", reason="torchao is optional (not in the test extra)")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.Tanh(), nn.Linear(96, 32), nn.Tanh(), nn.Linear(32, 48))
    torchao_q.quantize_(model, torchao_q.Int8WeightOnlyConfig())
    assert all(is_quantized(model[i]) for i in (0, 2, 4))
    twin = nn.Sequential(*[nn.Linear(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m
                           for m in model])
    with torch.no_grad():
        for i in (0, 2, 4):
            twin[i].weight.copy_(dequantize(model[i]))
            twin[i].bias.copy_(model[i].bias)
    return model, twin


def test_torchao_int8_weight_only() -> None:
    model, twin = _torchao_pair()
    x = torch.randn(20, 48, generator=torch.Generator().manual_seed(3))
    for m in (model, twin):
        randlora.inject(m, ["0", "2", "4"], r=8)
        randomize(m, 4)
    assert all(l.quantized for _, l in adapted_layers(model))
    assert not any(l.quantized for _, l in adapted_layers(twin))
    for (_, l), (_, t) in zip(adapted_layers(model), adapted_layers(twin)):  # the adapter term is exact
        xi = torch.randn(5, l.in_features)
        with torch.no_grad():
            assert _rel(l(xi) - l.base_layer(xi), xi.double() @ layer_delta(l).t()) <= TOL_FLOAT32
        assert _rel(l.base_layer(xi).detach(), F_linear(xi, t)) <= 1e-5  # the same base weights
    with torch.no_grad():
        assert _rel(model(x), twin(x)) <= 1e-5
    model.train()
    twin.train()
    for m in (model, twin):
        m(x).pow(2).mean().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if p.requires_grad:
            assert _rel(p.grad, q.grad) <= TOL_FLOAT32, n
    opt = torch.optim.AdamW(randlora.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # (snapshot() cannot read torchao tensors' bytes: the objects and the adapter are compared instead)
    mods, sd = list(model.modules()), {k: v.clone() for k, v in randlora.state_dict(model).items()}
    with pytest.raises(randlora.StateError, match="dequantize=True"):
        randlora.merge(model)
    assert list(model.modules()) == mods and all(torch.equal(v, randlora.state_dict(model)[k]) for k, v in sd.items())
    model.eval()
    with torch.no_grad():
        want = model(x)
    merged = copy.deepcopy(model)
    randlora.merge(merged, dequantize=True)
    assert all(type(merged[i]) is nn.Linear and type(merged[i].weight) is nn.Parameter for i in (0, 2, 4))
    with torch.no_grad():
        assert _rel(merged(x), want) <= TOL_FLOAT32
    weights = [model[i].weight for i in (0, 2, 4)]
    randlora.eject(model)
    assert all(model[i].weight is w and is_quantized(model[i]) for i, w in zip((0, 2, 4), weights))


def F_linear(x: torch.Tensor, layer: randlora.RandLoraLinear) -> torch.Tensor:
    """The float twin's base output ``x Wᵀ + b`` (its wrapper owns the weight)."""
    return torch.nn.functional.linear(x, layer.weight, layer.bias).detach()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep", [0, 1 << 24])
def test_mixed_rows_equal_rows_alone(kind: str, keep: int) -> None:
    """``randlora.mixed`` on quantized base layers: each row equals the row run alone with its adapter (int8: the
    base's own rounding differs with the batch, so within ``TOL_8BIT``); with ``keep_bytes`` the groups of 32 and
    64 tokens keep ``s·ΔW`` where its matmul beats the activation route (the base's forward stays the frozen
    term) and the second call reuses it."""
    model = _adapted(kind)
    randlora.inject(model, "all-linear", r=8, seed=0, name="b")
    randomize(model, 5, "b")
    names, ids = ["b", "default", None, "b"], _ids(batch=4, seq=32)
    want = []
    for i, name in enumerate(names):
        with contextlib.ExitStack() as stack:
            if name is None:
                stack.enter_context(randlora.disabled(model))
            else:
                randlora.use(model, name)
            want.append(_logits(model, ids[i:i + 1]))
    want = torch.cat(want)
    with torch.no_grad(), randlora.mixed(model, names, keep_bytes=keep) as state:
        got = [model(input_ids=ids).logits for _ in range(2)]
    assert (state.kept_bytes > 0) == (keep > 0)
    for g in got:
        assert _rel(g, want) <= (TOL_8BIT if kind == "int8" else TOL_FLOAT32)
