"""Export to a plain LoRA adapter: peft loads the folder and computes what the factors say; the factors
are the truncated SVD of the float64 reference update; CLI equals API; bad input is refused."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import randlora
from randlora.errors import CheckpointError, ConfigError, StateError
from randlora.export import (DEFAULT_ENERGY, LORA_CONFIG, LORA_WEIGHTS, LoraExport, export_file, factor, save_lora,
                             to_lora)
from randlora.walker import adapted_layers

from bench_loader import load_benchmark
from models import Net, randomize
from reference import layer_delta

peft = pytest.importorskip("peft", reason="peft is an optional test dependency (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def llama_cfg(bias=False):
    return transformers.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=97, attention_bias=bias, mlp_bias=bias, tie_word_embeddings=False)


def llama(bias=False, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_cfg(bias)).eval()


def trained_like(model, seed=0, scale=1.0):
    """λ ~ N(0, 1), γ ~ N(0, 1/m²) times ``scale``: a full-rank update with a spread spectrum."""
    randomize(model, seed)
    if scale != 1.0:
        with torch.no_grad():
            for _, l in adapted_layers(model):
                l.randlora_gamma.mul_(scale)


IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def adapted_llama(bias=False, r=8, alpha=16, scale=1.0):
    model = llama(bias)
    randlora.inject(model, "all-linear", r=r, alpha=alpha, bias="all" if bias else "none")
    trained_like(model, scale=scale)
    if bias:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in randlora.trainable_parameters(model):
                if p.dim() == 1:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def peft_lora(folder, bias=False):
    return peft.PeftModel.from_pretrained(llama(bias), str(folder)).eval()


def with_factors(exp: LoraExport, bias=False):
    """The base model with every exported layer's weight replaced by ``W + B A`` (float64 check of peft)."""
    model = llama(bias).double()
    with torch.no_grad():
        for p, l in exp.layers.items():
            mod = model.get_submodule(p)
            mod.weight.add_((l.lora_B.double() @ l.lora_A.double()))
        for k, t in exp.biases.items():
            model.get_parameter(k).copy_(t.double())
    return model


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------
# peft loads the folder
# ------------------------------------------------------------------------------------------------
def test_full_rank_matches_the_randlora_model(tmp_path):
    model = adapted_llama()
    want = logits(model)
    exp = save_lora(model, tmp_path / "lora", rank="full")
    assert all(l.rank == min(l.shape) for l in exp.layers.values())
    assert exp.max_error < 1e-5
    got = logits(peft_lora(tmp_path / "lora"))
    assert rel(got, want) < 1e-5
    cfg = json.loads((tmp_path / "lora" / LORA_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 48 and cfg["bias"] == "none"
    assert cfg["fan_in_fan_out"] is False and cfg["rank_pattern"] == {} and not cfg["use_rslora"]
    assert sorted(cfg["target_modules"]) == sorted(exp.layers)
    sd = load_file(str(tmp_path / "lora" / LORA_WEIGHTS))
    assert set(sd) == {f"base_model.model.{p}.lora_{x}.weight" for p in exp.layers for x in "AB"}
    q = "model.layers.0.mlp.down_proj"  # O=48 < I=80
    assert sd[f"base_model.model.{q}.lora_A.weight"].shape == (48, 80)
    assert sd[f"base_model.model.{q}.lora_B.weight"].shape == (48, 48)


@pytest.mark.parametrize("kw", [{"rank": 4}, {"rank": 16}, {"energy": 0.8}])
def test_truncated_adapter_reproduces_its_factors_in_peft(tmp_path, kw):
    """peft computes exactly ``W + B A`` per layer (keys, scale one, rank_pattern), and the model-output error
    against the RandLora model shrinks with the kept energy."""
    model = adapted_llama(scale=0.1)
    want = logits(model)
    exp = save_lora(model, tmp_path / "lora", **kw)
    got = logits(peft_lora(tmp_path / "lora"))
    assert rel(got, logits(with_factors(exp))) < 1e-5
    full = logits(peft_lora(tmp_path / "lora"))  # loaded twice: deterministic
    assert torch.equal(full, got)
    err = rel(got, want)
    assert 0 < err
    assert exp.max_error > 0
    cfg = json.loads((tmp_path / "lora" / LORA_CONFIG).read_text())
    ranks = exp.ranks
    assert cfg["r"] == cfg["lora_alpha"] == max(ranks.values())
    for p, k in ranks.items():
        if k != cfg["r"]:
            assert cfg["rank_pattern"][p] == cfg["alpha_pattern"][p] == k
    assert len(cfg["rank_pattern"]) == sum(k != cfg["r"] for k in ranks.values())
    if "energy" in kw:
        assert len(set(ranks.values())) > 1  # the layers' spectra differ: several ranks, all in rank_pattern


def test_output_error_is_bounded_by_the_reported_error(tmp_path):
    """One linear layer: ``‖y_lora − y‖_F ≤ error · ‖s·ΔW‖_F · ‖x‖_F`` (Cauchy-Schwarz per output)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(40, 64))
    randlora.inject(model, ["proj"], r=4, alpha=8)
    randomize(model, 2)
    x = torch.randn(50, 40)
    with torch.no_grad():
        y = model(x).double()
    dW = layer_delta(model.proj)
    for k in (1, 4, 12, 40):
        exp = to_lora(model, rank=k)
        l = exp.layers["proj"]
        y_lora = (x.double() @ (model.proj.weight.double() + l.lora_B.double() @ l.lora_A.double()).t()
                  + model.proj.bias.double())
        bound = l.error * float(dW.norm()) * float(x.double().norm())
        assert float((y_lora - y).norm()) <= bound * (1 + 1e-4) + 1e-5
        if k < 40:
            assert l.error > 1e-3


# ------------------------------------------------------------------------------------------------
# the default (neither rank nor energy): energy=DEFAULT_ENERGY
# ------------------------------------------------------------------------------------------------
def test_default_export_loads_in_peft_within_the_energy_bound(tmp_path):
    """``save_lora(model, folder)``: each layer keeps ``DEFAULT_ENERGY`` of ``‖s·ΔW‖_F²`` (the float64
    reference's smallest such rank), so its error is at most ``√(1 − DEFAULT_ENERGY)``, and peft's outputs
    differ from the RandLora model's by at most ``error · ‖s·ΔW‖_F · ‖x‖_F`` (one layer, Cauchy-Schwarz)."""
    def base():
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("proj", nn.Linear(40, 64))
        return model

    model = base()
    randlora.inject(model, ["proj"], r=4, alpha=8)
    randomize(model, 2)
    x = torch.randn(50, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x).double()
    exp = save_lora(model, tmp_path / "lora")
    D, S = _reference_svd(model.proj)
    cs = torch.cumsum(S**2, 0) / (S**2).sum()
    k = int((cs < DEFAULT_ENERGY - 1e-12).sum()) + 1  # the smallest rank keeping DEFAULT_ENERGY
    assert k < 40  # this spectrum is spread: the default truncates
    l = exp.layers["proj"]
    assert l.rank == k and l.energy >= DEFAULT_ENERGY - 1e-6
    bound = math.sqrt(1 - DEFAULT_ENERGY)
    assert 1e-3 < l.error <= bound + 1e-6
    cfg = json.loads((tmp_path / "lora" / LORA_CONFIG).read_text())
    assert cfg["r"] == cfg["lora_alpha"] == k
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(base(), str(tmp_path / "lora")).eval()(x).double()
    diff = float((got - want).norm())
    assert 0 < diff <= bound * float(D.norm()) * float(x.double().norm())
    assert diff <= l.error * float(D.norm()) * float(x.double().norm()) * (1 + 1e-4) + 1e-5


def test_default_on_a_full_rank_small_update():
    """A flat spectrum (every singular value the same share, ``1/n``): the default keeps the smallest
    ``k`` with ``k/n >= DEFAULT_ENERGY``, which is every direction when ``(n − 1)/n < DEFAULT_ENERGY``:
    the export is then exact. A small RandLora layer's update (full rank) gets the reference's rank."""
    g = torch.Generator().manual_seed(0)
    for n in (4, 8, 16):
        Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].float()
        A, B, k, err, kept = factor(3.0 * Q)
        assert k == math.ceil(DEFAULT_ENERGY * n - 1e-9)
        if k == n:
            assert err < 1e-6 and kept == pytest.approx(1.0, abs=1e-6)
            assert torch.allclose(B @ A, 3.0 * Q, atol=1e-5)
        else:
            assert err == pytest.approx(math.sqrt(1 - k / n), rel=1e-4)
    model = nn.Sequential()
    model.add_module("small", nn.Linear(8, 6))
    randlora.inject(model, ["small"], r=2, alpha=4)
    randomize(model, 4)
    D, S = _reference_svd(model.small)
    assert int((S > 1e-6 * S[0]).sum()) == 6  # full rank
    cs = torch.cumsum(S**2, 0) / (S**2).sum()
    l = to_lora(model).layers["small"]
    assert l.rank == int((cs < DEFAULT_ENERGY - 1e-12).sum()) + 1
    assert l.error <= math.sqrt(1 - DEFAULT_ENERGY) + 1e-6


def test_conv1d_gpt2_loads_in_peft(tmp_path):
    cfg = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=97, n_positions=32)

    def gpt2():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(cfg).eval()

    model = gpt2()
    randlora.inject(model, ["c_attn", "c_proj", "c_fc"], r=8, alpha=16)
    trained_like(model)
    want = logits(model)
    exp = save_lora(model, tmp_path / "lora", rank="full")
    conf = json.loads((tmp_path / "lora" / LORA_CONFIG).read_text())
    assert conf["fan_in_fan_out"] is True
    c_attn = exp.layers["transformer.h.0.attn.c_attn"]  # Conv1D(144, 48): O=144, I=48
    assert c_attn.lora_A.shape == (48, 48) and c_attn.lora_B.shape == (144, 48)
    got = logits(peft.PeftModel.from_pretrained(gpt2(), str(tmp_path / "lora")).eval())
    assert rel(got, want) < 1e-5


def test_trained_biases_are_written_and_loaded(tmp_path):
    model = adapted_llama(bias=True)
    want = logits(model)
    exp = save_lora(model, tmp_path / "lora", rank="full")
    cfg = json.loads((tmp_path / "lora" / LORA_CONFIG).read_text())
    assert cfg["bias"] == "all"
    sd = load_file(str(tmp_path / "lora" / LORA_WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in sd
    assert len(exp.biases) == sum(1 for n, _ in model.named_parameters() if n.endswith(".bias"))
    got = logits(peft_lora(tmp_path / "lora", bias=True))
    assert rel(got, want) < 1e-5
    # without the biases the outputs differ: they were really trained and really loaded
    assert rel(logits(llama(bias=True)), want) > 1e-3


# ------------------------------------------------------------------------------------------------
# the factors
# ------------------------------------------------------------------------------------------------
def _reference_svd(layer):
    D = layer_delta(layer)
    return D, torch.linalg.svdvals(D)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0, None])
def test_energy_picks_the_smallest_rank_keeping_it(energy):
    """``None``: neither rank nor energy given, the default ``energy=DEFAULT_ENERGY``."""
    model = Net(d=24, h=40)
    randlora.inject(model, ["q_proj", "up_proj", "down_proj"], r=4, alpha=8)
    randomize(model, 3)
    exp = to_lora(model, energy=energy, svd_dtype=torch.float64)
    energy = DEFAULT_ENERGY if energy is None else energy
    for p, layer in adapted_layers(model):
        D, S = _reference_svd(layer)
        e = S**2 / (S**2).sum()
        cs = torch.cumsum(e, 0)
        k = exp.layers[p].rank
        assert cs[k - 1] >= energy - 1e-12
        if k > 1:
            assert cs[k - 2] < energy
        # 1e-6: the library forms λ·A·γ in the parameters' float32 before the float64 product (3e-8 apart)
        assert exp.layers[p].energy == pytest.approx(float(cs[k - 1]), rel=1e-6)
        # the error is the optimal one of rank k (Eckart-Young): sqrt of the dropped energy
        assert exp.layers[p].error == pytest.approx(math.sqrt(max(0.0, 1 - float(cs[k - 1]))), abs=1e-6)


@pytest.mark.parametrize("method", ["svd", "lowrank", "auto"])
def test_fixed_rank_factors_against_the_float64_reference(method):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("wide", nn.Linear(256, 200))
    randlora.inject(model, ["wide"], r=16, alpha=32)
    randomize(model, 1)
    D, S = _reference_svd(model.wide)
    k = 8
    exp = to_lora(model, rank=k, method=method)
    l = exp.layers["wide"]
    assert l.lora_A.shape == (k, 256) and l.lora_B.shape == (200, k) and l.lora_A.dtype == torch.float32
    E = D - l.lora_B.double() @ l.lora_A.double()
    assert l.error == pytest.approx(float(E.norm() / D.norm()), rel=1e-4)
    optimal = float(S[k:].norm() / S.norm())
    assert optimal <= l.error <= optimal * (1 + 1e-5 if method == "svd" else 1.02)
    # the balanced split: A Aᵀ and Bᵀ B both equal diag(σ_1..σ_k)
    assert torch.allclose(l.lora_A.double() @ l.lora_A.double().t(), torch.diag(S[:k]), rtol=1e-3, atol=1e-3 * S[0])


def test_rank_is_capped_per_layer_and_dtype_is_honoured(tmp_path):
    model = Net(d=12, h=20)
    randlora.inject(model, ["q_proj", "up_proj"], r=4, alpha=8)
    randomize(model, 0)
    exp = to_lora(model, rank=16, dtype=torch.bfloat16)
    assert exp.layers["layers.0.q_proj"].rank == 12 and exp.layers["layers.0.up_proj"].rank == 12
    assert exp.layers["layers.0.q_proj"].lora_A.dtype == torch.bfloat16
    assert 1e-4 < exp.max_error < 2e-2  # bfloat16 rounding of the factors is part of the reported error
    cfg = exp.adapter_config()
    assert cfg["r"] == 12 and cfg["rank_pattern"] == {}


def test_zero_update_exports_rank_one_zero_factors():
    model = Net(d=12, h=20)
    randlora.inject(model, ["q_proj"], r=4)  # λ = 0: ΔW = 0
    exp = to_lora(model, energy=0.9)
    for l in exp.layers.values():
        assert l.rank == 1 and l.error == 0.0 and not l.lora_B.any()


def test_export_leaves_the_model_and_random_stream_unchanged():
    model = Net(d=64, h=96)
    randlora.inject(model, ["q_proj", "up_proj", "down_proj"], r=8, alpha=16)
    randomize(model, 0)
    before = {k: v.clone() for k, v in randlora.state_dict(model).items()}
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    a = to_lora(model, rank=4, method="lowrank")
    assert torch.equal(torch.rand(3), want)
    b = to_lora(model, rank=4, method="lowrank")
    for p in a.layers:
        assert torch.equal(a.layers[p].lora_A, b.layers[p].lora_A)  # deterministic
    after = randlora.state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_named_adapter_is_exported():
    model = Net(d=12, h=20)
    randlora.inject(model, ["q_proj", "up_proj"], r=4, alpha=8)
    randlora.inject(model, ["q_proj"], r=4, alpha=8, name="b")
    randomize(model, 0, name="b")
    exp = to_lora(model, rank="full", name="b")
    assert sorted(exp.layers) == ["layers.0.q_proj", "layers.1.q_proj"]
    ref = reference_named(model, "layers.0.q_proj", "b")
    l = exp.layers["layers.0.q_proj"]
    assert torch.allclose(l.lora_B.double() @ l.lora_A.double(), ref, atol=1e-5 * float(ref.abs().max()))


def reference_named(model, path, name):
    from reference import reference_delta

    layer = model.get_submodule(path)
    ad = layer.adapter(name)
    lam, gam, s = ad.randlora_lambda, ad.randlora_gamma, ad.scaling
    bank = layer.bank
    return reference_delta(lam.detach(), gam.detach(), bank.A, bank.B, layer.out_features, layer.in_features, s)


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------
def _with_threads(n, fn):
    """``fn()`` run with ``torch.set_num_threads(n)``; the export must leave the count as it found it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        out = fn()
        assert torch.get_num_threads() == n
        return out
    finally:
        torch.set_num_threads(before)


def _assert_same_factors(a: LoraExport, b: LoraExport):
    assert a.ranks == b.ranks
    for p, l in a.layers.items():
        assert torch.equal(l.lora_A, b.layers[p].lora_A), p
        assert torch.equal(l.lora_B, b.layers[p].lora_B), p


# layers big enough that LAPACK's float32 SVD rounds differently on 1 and 2 threads (measured without the
# single-thread factoring: every case differed, by up to 1.8e-4 element-wise on these layers)
@pytest.mark.parametrize("kw", [{"rank": 6}, {"rank": 6, "method": "lowrank"}, {"rank": 40, "method": "svd"},
                                {"rank": "full"}, {"energy": 0.8}])
def test_factors_do_not_depend_on_the_thread_count(tmp_path, kw):
    from randlora.__main__ import main

    model = Net(d=160, h=400)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    randlora.inject(model, ["q_proj", "up_proj", "down_proj"], r=8, alpha=16)
    randomize(model, 0)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=False)
    one = _with_threads(1, lambda: to_lora(model, **kw))
    two = _with_threads(2, lambda: to_lora(model, **kw))
    _assert_same_factors(one, two)
    # the command line (2 threads) writes what save_lora writes on 1 thread, bit for bit
    argv = [a for k, v in kw.items() for a in (f"--{k}", str(v))]
    _with_threads(1, lambda: save_lora(model, tmp_path / "api", **kw))
    assert _with_threads(2, lambda: main(["export-lora", str(tmp_path / "ad.safetensors"), "--base",
                                          str(tmp_path / "base.safetensors"), "--out", str(tmp_path / "cli"),
                                          *argv])) == 0
    a, c = load_file(str(tmp_path / "api" / LORA_WEIGHTS)), load_file(str(tmp_path / "cli" / LORA_WEIGHTS))
    assert set(a) == set(c) and len(a) == 12
    for k in a:
        assert torch.equal(a[k], c[k]), k


def test_factor_signs_are_fixed_and_the_thread_count_restored_on_error():
    model = Net(d=40, h=72)
    randlora.inject(model, ["q_proj", "up_proj", "down_proj"], r=4, alpha=8)
    randomize(model, 2)
    for method in ("svd", "lowrank"):
        exp = to_lora(model, rank=5, method=method)
        for p, l in exp.layers.items():
            B = l.lora_B
            peak = B.gather(0, B.abs().argmax(0, keepdim=True))[0]
            assert bool((peak > 0).all()), (p, method)  # the largest-magnitude entry of each column
    with torch.no_grad():
        model.layers[0].q_proj.randlora_lambda[0, 0] = float("inf")

    def bad():
        with pytest.raises(StateError, match="inf/nan"):
            to_lora(model, rank=2)

    _with_threads(2, bad)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,args", [({"rank": 6}, ["--rank", "6"]), ({"energy": 0.7}, ["--energy", "0.7"]),
                                     ({"rank": "full"}, ["--rank", "full"]), ({}, [])])
@pytest.mark.parametrize("save_projection", [False, True])
def test_cli_equals_the_python_api(tmp_path, kw, args, save_projection, capsys):
    from randlora.__main__ import main

    model = llama(bias=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    randlora.inject(model, ["q_proj", "up_proj", "down_proj"], r=8, alpha=16, bias="randlora_only")
    trained_like(model)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=save_projection)
    save_lora(model, tmp_path / "api", **kw)
    rc = main(["export-lora", str(tmp_path / "ad.safetensors"), "--base", str(tmp_path / "base.safetensors"),
               "--out", str(tmp_path / "cli"), *args])
    assert rc == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "wrote a LoRA adapter" in out
    a, c = load_file(str(tmp_path / "api" / LORA_WEIGHTS)), load_file(str(tmp_path / "cli" / LORA_WEIGHTS))
    assert set(a) == set(c) and any(k.endswith(".base_layer.bias") for k in a)
    for k in a:
        assert torch.equal(a[k], c[k]), k
    ca = json.loads((tmp_path / "api" / LORA_CONFIG).read_text())
    cc = json.loads((tmp_path / "cli" / LORA_CONFIG).read_text())
    assert ca == cc and ca["bias"] == "lora_only"


@pytest.mark.parametrize("wdtype,args,api_dtype", [(torch.bfloat16, [], None),
                                                    (torch.float32, ["--dtype", "bfloat16"], torch.bfloat16)])
def test_cli_equals_the_python_api_in_bfloat16(tmp_path, wdtype, args, api_dtype):
    """A bf16 model keeps its bank in bf16: the file route must build ΔW from the same rounded bases."""
    from randlora.__main__ import main

    torch.manual_seed(0)
    model = Net(d=24, h=40).to(wdtype)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    randlora.inject(model, ["q_proj", "up_proj", "down_proj"], r=4, alpha=8)
    randomize(model, 1)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=False)
    api = to_lora(model, rank=5, dtype=api_dtype)
    assert main(["export-lora", str(tmp_path / "ad.safetensors"), "--base", str(tmp_path / "base.safetensors"),
                 "--out", str(tmp_path / "cli"), "--rank", "5", *args]) == 0
    c = load_file(str(tmp_path / "cli" / LORA_WEIGHTS))
    for p, l in api.layers.items():
        assert l.lora_A.dtype == torch.bfloat16
        assert torch.equal(c[f"base_model.model.{p}.lora_A.weight"], l.lora_A)
        assert torch.equal(c[f"base_model.model.{p}.lora_B.weight"], l.lora_B)


def test_cli_peft_randlora_folder_with_prefix(tmp_path):
    model = Net(d=12, h=20)
    save_file({f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "base.safetensors"))
    randlora.inject(model, ["q_proj", "down_proj"], r=4, alpha=8, recipe="peft")
    randomize(model, 0)
    randlora.save_peft(model, tmp_path / "peft", save_projection=False)
    # a prefix that maps no layer: refused before anything is written
    with pytest.raises(CheckpointError, match="4 of the adapter's 4 layers are not in the weights .* --prefix FROM=TO"):
        export_file(tmp_path / "peft", tmp_path / "base.safetensors", tmp_path / "x", rank=3, prefix="other.")
    assert not (tmp_path / "x").exists()
    api = to_lora(model, rank=3)
    # found without a prefix ('model.' added), or with it given: the same factors, keys of the adapter's paths
    for out, prefix in (("auto", None), ("given", "model."), ("pair", ("", "model."))):
        exp = export_file(tmp_path / "peft", tmp_path / "base.safetensors", tmp_path / out, rank=3, prefix=prefix)
        assert exp.source["paths"].add == "model." and exp.source["file"].endswith("adapter_model.safetensors")
        for p in api.layers:
            assert torch.equal(exp.layers[p].lora_A, api.layers[p].lora_A)
            assert torch.equal(exp.layers[p].lora_B, api.layers[p].lora_B)
        assert sorted(load_file(str(tmp_path / out / LORA_WEIGHTS)))[0].startswith("base_model.model.layers.")


def test_cli_bad_input(tmp_path, capsys):
    from randlora.__main__ import main

    model = Net(d=12, h=20)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    randlora.inject(model, ["q_proj"], r=4)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=False)
    common = [str(tmp_path / "ad.safetensors"), "--base", str(tmp_path / "base.safetensors")]
    assert main(["export-lora", *common, "--out", str(tmp_path / "o"), "--rank", "0"]) == 1
    assert "rank must be a positive int" in capsys.readouterr().err
    assert main(["export-lora", *common, "--out", str(tmp_path / "o"), "--rank", "x"]) == 1
    assert "--rank must be" in capsys.readouterr().err
    assert main(["export-lora", *common, "--out", str(tmp_path / "o"), "--energy", "1.5"]) == 1
    assert "energy must be a number in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # both --rank and --energy
        main(["export-lora", *common, "--out", str(tmp_path / "o"), "--rank", "2", "--energy", "0.9"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert main(["export-lora", *common, "--out", str(tmp_path / "full"), "--rank", "2"]) == 1
    assert f"{tmp_path / 'full'} exists and is not empty; nothing was written" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "x" and not (tmp_path / "full" / LORA_WEIGHTS).exists()
    assert main(["export-lora", *common, "--out", str(tmp_path / "full"), "--rank", "2", "--force"]) == 0
    assert (tmp_path / "full" / LORA_WEIGHTS).exists() and (tmp_path / "full" / "keep.txt").read_text() == "x"
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# bad input (Python API)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    ({"rank": 0}, "rank must be a positive int"),
    ({"rank": -3}, "rank must be a positive int"),
    ({"rank": 2.5}, "rank must be a positive int"),
    ({"rank": True}, "rank must be a positive int"),
    ({"energy": 0.0}, r"energy must be a number in \(0, 1\]"),
    ({"energy": 1.01}, r"energy must be a number in \(0, 1\]"),
    ({"energy": float("nan")}, r"energy must be a number in \(0, 1\]"),
    ({"rank": 4, "energy": 0.9}, "pass at most one of rank .* not both"),
    ({"rank": "full", "energy": 1.0}, "pass at most one of rank .* not both"),
    ({"rank": 4, "method": "qr"}, "method must be one of"),
    ({"energy": 0.9, "method": "lowrank"}, "needs a fixed rank"),
    ({"method": "lowrank"}, "needs a fixed rank"),  # the default is an energy
    ({"rank": 4, "dtype": torch.int8}, "dtype must be a floating-point"),
])
def test_bad_settings_are_refused(tmp_path, kw, match):
    model = Net(d=12, h=20)
    randlora.inject(model, ["q_proj"], r=4)
    with pytest.raises(ConfigError, match=match):
        save_lora(model, tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()


def test_model_without_adapter_and_bad_folders(tmp_path):
    with pytest.raises(StateError, match="no RandLora adapter"):
        to_lora(Net(), rank=4)
    model = Net(d=12, h=20)
    randlora.inject(model, ["q_proj"], r=4)
    with pytest.raises(StateError, match="no adapter 'nope'"):
        to_lora(model, rank=4, name="nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        save_lora(model, tmp_path / "file", rank=2)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        save_lora(model, tmp_path / "d", rank=2)
    exp = to_lora(model, rank=2)
    with pytest.raises(ConfigError, match="already factored"):
        save_lora(exp, tmp_path / "e", rank=2)
    save_lora(model, tmp_path / "empty_ok", rank=2)  # a new folder is created
    assert (tmp_path / "empty_ok" / LORA_CONFIG).is_file()
    with torch.no_grad():
        model.layers[1].q_proj.randlora_lambda[0, 0] = float("nan")
    with pytest.raises(StateError, match="layers.1.q_proj: its update s·ΔW holds inf/nan"):
        save_lora(model, tmp_path / "nan", rank=2)
    assert not (tmp_path / "nan").exists()
    with pytest.raises(ConfigError, match="expected a 2-D floating-point"):
        factor(torch.zeros(3, dtype=torch.float32), rank=1)


def test_ambiguous_paths_get_exact_patterns(tmp_path):
    """Module paths that are tails of other modules' paths (``proj``, ``enc.proj``, ``dec.proj``):
    target_modules becomes a full-match regex and rank_pattern keys are anchored, so peft adapts and sizes
    exactly the exported layers."""

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = Inner()
            self.dec = Inner()
            self.proj = nn.Linear(16, 6)
            self.head = nn.Linear(6, 4)

        def forward(self, x):
            return self.head(self.proj(self.dec(self.enc(x))))

    def base():
        torch.manual_seed(0)
        return Outer()

    model = base()
    randlora.inject(model, ["proj"], r=4, alpha=8, exclude=["dec.proj"])
    randomize(model, 0)
    x = torch.randn(5, 16)
    with torch.no_grad():
        want = model(x)
    exp = save_lora(model, tmp_path / "lora", rank="full")
    cfg = json.loads((tmp_path / "lora" / LORA_CONFIG).read_text())
    assert isinstance(cfg["target_modules"], str)
    assert cfg["r"] == 16 and cfg["rank_pattern"] == {"^proj": 6}
    pm = peft.PeftModel.from_pretrained(base(), str(tmp_path / "lora")).eval()
    inner = pm.base_model.model
    assert not hasattr(inner.dec.proj, "lora_A") and hasattr(inner.enc.proj, "lora_A")
    assert inner.proj.lora_A["default"].weight.shape == (6, 16)
    with torch.no_grad():
        got = pm(x)
    assert exp.max_error < 1e-5 and rel(got, want) < 1e-5


def test_benchmark_quick(tmp_path, capsys):
    """The benchmark runs end to end on a small model and its figures are consistent."""
    mod = load_benchmark("export")
    threads = torch.get_num_threads()
    try:
        mod.main(["--quick", "--reps", "1", "--out", str(tmp_path / "e.json")])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "e.json").read_text())
    rows = {(r["profile"], r["rank"]): r for r in data["model"]}
    for profile in ("0.5", "iid"):
        assert rows[(profile, 4)]["max_err"] > rows[(profile, 16)]["max_err"] > 1e-3
        assert rows[(profile, "full")]["max_err"] < 1e-5 and rows[(profile, "full")]["out_err"] < 1e-5
    assert all(1 - 1e-5 <= r["lowrank_err"] / r["optimal_err"] < 1.02 for r in data["layer"])  # float32 vs float64
    assert "| λ/γ | rank |" in capsys.readouterr().out
