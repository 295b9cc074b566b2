"""Property tests (hypothesis) on random stacks of linear layers, plus thread safety of injection.

Shapes are drawn from {1, 2, 3, 5, 8} so every draw mixes ``O < I``, ``O > I``, ``O = I``, sizes of 1
and ``r > min(O, I)``; targets, bases mode, recipe, forward path, bias mode, dtype, seed and frozen
parameters are random too. Settings are bounded so the module runs in seconds:
``max_examples = 30`` per property, ``deadline=None``, at most 3 layers.

Weights are float32, float64, bfloat16 or float16 (float32/float64 only where a float64 reference bound
is checked). Tolerances (u = unit roundoff of the weight dtype: 2^-24 float32, 2^-53 float64, 2^-8
bfloat16, 2^-11 float16):
- a layer's output, merged or not, is within ``(I + O + n·r + 8) · u · (|x| (|W| + s|B||S|)ᵀ + |b|)`` of the
  float64 reference built from the definition (the standard worst-case bound of the dot products involved);
- after ``merge(unload=False)`` then ``unmerge`` every weight is within ``3 · u · (|W| + |s·ΔW|)`` (plus two
  subnormal steps) of the original (two roundings, of ``W + s·ΔW`` and of the difference);
- init (``λ = 0``), state-dict round trips and inject-then-eject are exact (bit for bit).
"""

from __future__ import annotations

import tempfile
import threading
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from torch import nn

import randlora
from randlora.planner import PATHS
from randlora.recipes import MODES
from randlora.walker import adapted_layers
from reference import reference_delta
from test_errors import assert_unchanged, snapshot

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZES = (1, 2, 3, 5, 8)


class Stack(nn.Module):
    """``x -> tanh(L_k(... tanh(L_1(x))))`` over ``nn.Linear`` layers ``layers.0 ... layers.k-1``."""

    def __init__(self, dims: list[int], biases: list[bool]) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(i, o, bias=b) for i, o, b in zip(dims, dims[1:], biases)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


EXACT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
WIDE_DTYPES = (torch.float32, torch.float64)


@st.composite
def setups(draw, dtypes: tuple[torch.dtype, ...] = EXACT_DTYPES) -> dict:
    depth = draw(st.integers(1, 3))
    dims = draw(st.lists(st.sampled_from(SIZES), min_size=depth + 1, max_size=depth + 1))
    targets = sorted(draw(st.sets(st.integers(0, depth - 1), min_size=1)))
    largest = max(max(dims[i], dims[i + 1]) for i in targets)  # inject refuses r above it
    return {
        "dims": dims,
        "biases": draw(st.lists(st.booleans(), min_size=depth, max_size=depth)),
        "targets": targets,
        "r": draw(st.integers(1, min(6, largest))),
        "alpha": draw(st.sampled_from([None, 1.0, 8.0])),
        "bases": draw(st.sampled_from(MODES)),
        "recipe": draw(st.sampled_from(["portable", "peft"])),
        "path": draw(st.sampled_from(PATHS)),
        "bias": draw(st.sampled_from(["none", "all", "randlora_only"])),
        "dtype": draw(st.sampled_from(dtypes)),
        "seed": draw(st.integers(0, 2**32)),
        "model_seed": draw(st.integers(0, 2**16)),
        "frozen": draw(st.lists(st.booleans(), min_size=2 * depth, max_size=2 * depth)),
    }


def build(cfg: dict) -> Stack:
    torch.manual_seed(cfg["model_seed"])
    model = Stack(cfg["dims"], cfg["biases"]).to(cfg["dtype"])
    for p, frozen in zip(model.parameters(), cfg["frozen"]):
        p.requires_grad_(not frozen)
    return model


def inject(model: nn.Module, cfg: dict) -> randlora.InjectReport:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # std() of a 1-element draw, refused just below
            rep = randlora.inject(model, [f"layers.{i}" for i in cfg["targets"]], r=cfg["r"], alpha=cfg["alpha"],
                                  seed=cfg["seed"], bases=cfg["bases"], recipe=cfg["recipe"], bias=cfg["bias"])
    except randlora.ConfigError as e:
        # the "peft" recipe cannot make bases this small (std of one entry / of all zeros); that refusal
        # is itself a row of the error table; here it only means this draw has nothing to test
        assert cfg["recipe"] == "peft" and "non-finite" in str(e), e
        reject()
    for _, layer in adapted_layers(model):
        layer.set_path(cfg["path"])
    return rep


def randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            lam, gam = layer.randlora_lambda, layer.randlora_gamma
            lam.copy_(torch.randn(lam.shape, generator=g, dtype=torch.float64))
            gam.copy_(torch.randn(gam.shape, generator=g, dtype=torch.float64) / layer.scaling)


def inputs(cfg: dict, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg["model_seed"] + 1)
    return torch.randn(batch, cfg["dims"][0], generator=g, dtype=torch.float64).to(cfg["dtype"])


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def subnormal_spacing(dtype: torch.dtype) -> float:
    """Absolute rounding step below the smallest normal number (where relative bounds stop holding)."""
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


def reference_parts(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s·ΔW, s·|B||S|)`` in float64 straight from the definition (the second bounds rounding errors)."""
    bank = layer.bank
    lam, gam = layer.randlora_lambda.detach(), layer.randlora_gamma.detach()
    O, I, s = layer.out_features, layer.in_features, layer.scaling
    delta = reference_delta(lam, gam, bank.A, bank.B, O, I, s)
    mag = reference_delta(lam.abs(), gam.abs(), bank.A.abs(), bank.B.abs(), O, I, s)
    return delta, mag


# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(setups())
def test_init_leaves_outputs_unchanged(cfg: dict) -> None:
    model = build(cfg)
    x = inputs(cfg)
    with torch.no_grad():
        before = model(x)
    inject(model, cfg)
    with torch.no_grad():
        after_eval = model(x)
    after_grad = model(x.requires_grad_(True))  # the autograd op's path
    assert torch.equal(after_eval, before)
    assert torch.equal(after_grad.detach(), before)
    with randlora.disabled(model), torch.no_grad():
        assert torch.equal(model(x), before)


@SETTINGS
@given(setups(WIDE_DTYPES))
def test_merge_equals_unmerged_and_the_reference(cfg: dict) -> None:
    model = build(cfg)
    inject(model, cfg)
    randomize(model, cfg["seed"] % 1000)
    u = unit_roundoff(cfg["dtype"])
    g = torch.Generator().manual_seed(cfg["model_seed"] + 2)
    layers = dict(adapted_layers(model))
    per_layer = {}
    for name, layer in layers.items():
        O, I = layer.out_features, layer.in_features
        x = torch.randn(4, I, generator=g, dtype=torch.float64).to(cfg["dtype"])
        delta, mag = reference_parts(layer)
        W, b = layer.weight.detach().double(), layer.bias
        bd = b.detach().double() if b is not None else torch.zeros(O, dtype=torch.float64)
        ref = x.double() @ (W + delta).t() + bd
        bound = (I + O + layer.r * layer.n + 8) * u * (x.double().abs() @ (W.abs() + mag).t() + bd.abs())
        unmerged_op = layer(x.clone().requires_grad_(True)).detach().double()
        with torch.no_grad():
            unmerged_eval = layer(x).double()
        per_layer[name] = (x, ref, bound, unmerged_op, unmerged_eval)
    for name, (x, ref, bound, y_op, y_eval) in per_layer.items():
        assert ((y_op - ref).abs() <= bound).all(), name
        assert ((y_eval - ref).abs() <= bound).all(), name
    randlora.merge(model)  # unload: the original nn.Linear objects come back, with merged weights
    assert not list(adapted_layers(model)) and all(type(m) is nn.Linear for m in model.layers)
    for name, (x_l, ref, bound, y_op, _) in per_layer.items():
        with torch.no_grad():
            y_merged = model.get_submodule(name)(x_l).double()
        assert ((y_merged - ref).abs() <= bound).all(), name
        assert ((y_merged - y_op).abs() <= 2 * bound).all(), name


@SETTINGS
@given(setups())
def test_unmerge_restores_weights(cfg: dict) -> None:
    model = build(cfg)
    inject(model, cfg)
    randomize(model, cfg["seed"] % 997)
    u = unit_roundoff(cfg["dtype"])
    layers = dict(adapted_layers(model))
    W0 = {n: l.weight.detach().clone() for n, l in layers.items()}
    D = {n: l.delta_weight().detach().clone() for n, l in layers.items()}
    randlora.merge(model, unload=False)
    assert all(l.merged for l in layers.values())
    randlora.unmerge(model)
    for n, l in layers.items():
        assert not l.merged
        err = (l.weight.detach().double() - W0[n].double()).abs()
        bound = 3 * u * (W0[n].double().abs() + D[n].double().abs()) + 2 * subnormal_spacing(cfg["dtype"])
        assert (err <= bound).all(), n
        assert D[n].abs().max() > 0 or torch.equal(l.weight.detach(), W0[n]), n


@SETTINGS
@given(setups(), st.booleans())
def test_state_dict_round_trip_is_exact(cfg: dict, save_projection: bool) -> None:
    model = build(cfg)
    inject(model, cfg)
    randomize(model, cfg["seed"] % 991)
    if cfg["bias"] != "none":
        with torch.no_grad():
            for p in randlora.trainable_parameters(model):
                if p.dim() == 1:
                    p.add_(0.25)
    sd = randlora.state_dict(model, save_projection=save_projection)
    x = inputs(cfg)
    with torch.no_grad():
        y = model(x)

    def same(a: dict, b: dict) -> None:
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

    twin = build(cfg)
    inject(twin, cfg)
    randlora.load_state_dict(twin, {k: v.clone() for k, v in sd.items()})
    same(randlora.state_dict(twin), randlora.state_dict(model))
    with torch.no_grad():
        assert torch.equal(twin(x), y)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.safetensors"
        randlora.save(model, path, save_projection=save_projection)
        plain = build(cfg)
        randlora.load(plain, path)
    for _, layer in adapted_layers(plain):
        layer.set_path(cfg["path"])
    same(randlora.state_dict(plain), randlora.state_dict(model))
    with torch.no_grad():
        assert torch.equal(plain(x), y)


@SETTINGS
@given(setups(), st.sampled_from(["nothing", "forward", "train step", "disabled", "merge and unmerge"]))
def test_inject_then_eject_restores_the_model_bit_for_bit(cfg: dict, work: str) -> None:
    model = build(cfg)
    x = inputs(cfg)
    before = snapshot(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    inject(model, cfg)
    randomize(model, cfg["seed"] % 983)
    if work == "forward":
        with torch.no_grad():
            model(x)
    elif work == "train step":
        opt = torch.optim.SGD(randlora.trainable_parameters(model), lr=0.1)
        model(x).square().sum().backward()
        opt.step()
    elif work == "disabled":
        with randlora.disabled(model), torch.no_grad():
            model(x)
    elif work == "merge and unmerge":
        randlora.merge(model, unload=False)
        randlora.unmerge(model)
    randlora.eject(model)
    after = snapshot(model)
    if work == "merge and unmerge":
        # the weights went through a float round trip (see test_unmerge_restores_weights); the rest is exact
        after["state_dict"] = before["state_dict"]
        after["buffers"] = before["buffers"]
    elif work == "train step" and cfg["bias"] != "none":
        # trained biases are the adapter's; eject keeps what training made of them
        trained = {k for k, v in model.state_dict().items() if k.endswith("bias") and not torch.equal(v, weights[k])}
        after["state_dict"] = [e for e in after["state_dict"] if e[0] not in trained]
        before = {**before, "state_dict": [e for e in before["state_dict"] if e[0] not in trained]}
    assert_unchanged(before, after)
    assert not hasattr(model, "randlora_bank") and not hasattr(model, "randlora_A")


# ------------------------------------------------------------------------------------------------
# threads and seeds
# ------------------------------------------------------------------------------------------------
def _small(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 16))


@pytest.mark.parametrize("recipe", ["portable", "peft"])
def test_injecting_independent_models_from_threads(recipe: str) -> None:
    """8 threads inject 8 independent models at once (different seeds): each ends up exactly as a
    sequential injection makes it, bank and outputs, and no thread fails."""
    seeds = list(range(8))
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(0))
    expected = {}
    for s in seeds:
        m = _small(s)
        randlora.inject(m, ["0", "2"], r=4, seed=100 + s, recipe=recipe)
        randomize(m, s)
        with torch.no_grad():
            expected[s] = (m.randlora_bank.A.clone(), m.randlora_bank.B.clone(), m(x))
    models = {s: _small(s) for s in seeds}
    barrier = threading.Barrier(len(seeds))
    errors: list[BaseException] = []

    def work(s: int) -> None:
        try:
            barrier.wait()
            randlora.inject(models[s], ["0", "2"], r=4, seed=100 + s, recipe=recipe)
            randomize(models[s], s)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for s, m in models.items():
        A, B, y = expected[s]
        assert torch.equal(m.randlora_bank.A, A) and torch.equal(m.randlora_bank.B, B), s
        with torch.no_grad():
            assert torch.equal(m(x), y), s
    ptrs = {models[s].randlora_bank.A.data_ptr() for s in seeds}
    assert len(ptrs) == len(seeds)


def _storages(model: nn.Module) -> set[int]:
    bank = model.randlora_bank
    return {bank.A.untyped_storage().data_ptr(), bank.B.untyped_storage().data_ptr()}


@pytest.mark.parametrize("recipe", ["portable", "peft"])
@pytest.mark.parametrize("bases", MODES)
def test_models_with_different_seeds_never_share_bases(recipe: str, bases: str) -> None:
    a, b = _small(0), _small(0)
    randlora.inject(a, ["0", "2"], r=4, seed=1, recipe=recipe, bases=bases)
    randlora.inject(b, ["0", "2"], r=4, seed=2, recipe=recipe, bases=bases)
    assert not _storages(a) & _storages(b)
    assert not torch.equal(a.randlora_bank.A, b.randlora_bank.A)
    assert not torch.equal(a.randlora_bank.B, b.randlora_bank.B)


def test_loading_bases_into_one_model_leaves_a_same_seed_model_alone() -> None:
    """Even two models with the SAME seed must not alias their banks: taking bases from a checkpoint
    (here: bases from "another machine", same seed/recipe/shape, their own checksum) changes one only."""
    from randlora.bank import bases_checksum

    a, b = _small(0), _small(0)
    for m in (a, b):
        randlora.inject(m, ["0", "2"], r=4, seed=7)
    B_before = (b.randlora_bank.A.clone(), b.randlora_bank.B.clone())
    sd = {k: v.clone() for k, v in randlora.state_dict(a, save_projection=True).items()}
    sd["randlora_A"] = sd["randlora_A"] * 0.5
    sd["randlora_fingerprint"][-1] = bases_checksum(sd["randlora_A"], sd["randlora_B"])
    randlora.load_state_dict(a, sd)
    assert torch.equal(a.randlora_bank.A, sd["randlora_A"])
    assert torch.equal(b.randlora_bank.A, B_before[0]) and torch.equal(b.randlora_bank.B, B_before[1])
