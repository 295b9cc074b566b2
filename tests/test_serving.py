"""Mixed batches (``randlora.mixed``): each row through its own adapter, equal to the row run alone with that
adapter active; training, ``generate()`` with a KV cache, the refusals, and the serving benchmark's smoke run."""

from __future__ import annotations

import contextlib
import copy
import json
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import randlora
from randlora.errors import StateError
from randlora.serving import Mixed
from randlora.walker import adapted_layers
from models import TARGETS, Net
from models import randomize
from bench_loader import load_benchmark

NAMES = ["default", "b", "c", None]
SUBSET = ["layers.0.q_proj", "layers.1.up_proj"]  # adapter "c" lives on these two layers only
TOL = dict(rtol=1e-5, atol=1e-5)
# Row-for-row equality is checked in float64: in float32 the same row computed in batches of other sizes goes
# through other BLAS kernels, and on this net (outputs up to about 7) that rounding alone exceeds 1e-5 in about
# one random case in 300, mixed block or not; in float64 the mixed and the alone rows agree to about 1e-14.
TOL64 = dict(rtol=1e-10, atol=1e-10)


def served(bases: str = "dense", dropout: float = 0.0) -> nn.Module:
    """Net (fp32) with three adapters on one bank: "default" and "b" on every target, "c" on two layers."""
    torch.manual_seed(0)
    model = Net()
    randlora.inject(model, TARGETS, r=4, bases=bases, dropout=dropout)
    randlora.inject(model, TARGETS, r=4, alpha=12.0, bases=bases, name="b", dropout=dropout)
    randlora.inject(model, SUBSET, r=4, alpha=4.0, bases=bases, name="c", dropout=dropout)
    for seed, name in enumerate(["default", "b", "c"], 1):
        randomize(model, seed, name)
    return model


_MODELS: dict[tuple[str, torch.dtype], nn.Module] = {}


def cached_model(bases: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    if (bases, dtype) not in _MODELS:
        _MODELS[bases, dtype] = served(bases).to(dtype).eval()
    return _MODELS[bases, dtype]


def alone(model, names, x: torch.Tensor, adapted: nn.Module | None = None) -> torch.Tensor:
    """Each row of ``x`` through ``model`` on its own, with its adapter active in ``adapted`` (default: ``model``;
    ``None``: every adapter off)."""
    adapted = model if adapted is None else adapted
    before = randlora.active_adapter(adapted)
    out = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name is None:
                with randlora.disabled(adapted):
                    out.append(model(x[i:i + 1]))
            else:
                randlora.use(adapted, name)
                out.append(model(x[i:i + 1]))
    randlora.use(adapted, before)
    return torch.cat(out)


def untouched(model: nn.Module):
    """What a mixed block must leave as it found: flags, hooks, the active adapter, every tensor."""
    return ([(p, l.disabled, len(l._forward_hooks), l.merged) for p, l in adapted_layers(model)],
            randlora.active_adapter(model), {k: v.clone() for k, v in model.state_dict().items()})


def assert_untouched(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


# ------------------------------------------------------------------------------------------------
# equality with the rows run alone
# ------------------------------------------------------------------------------------------------
ROUTES = ["auto", "dense", "sparse", "grouped"]  # the no-grad plans: batched (dense views or non-zeros), grouped


def forced(model, route: str, bases: str):
    """Force the no-grad choice between one batched pass (per-row λ/γ) and one op call per group."""
    if route == "auto":
        return contextlib.nullcontext()
    mixed = {"grouped": "grouped", "dense": "batched"}.get(route, "batched" if bases == "dense" else "batched-sparse")
    return randlora.force_route(model, mixed=mixed)


def spied(seen: list):
    """``Mixed.plan`` recording the kind of each layer call's plan in ``seen``."""
    real = Mixed.plan

    def spy(self, layer, x, present=None, cd=None):
        plan = real(self, layer, x, present, cd)
        seen.append(plan.kind)
        return plan

    return mock.patch.object(Mixed, "plan", spy)


def test_both_no_grad_routes_are_taken_by_the_cost_rule():
    model, seen = cached_model("dense"), []
    with torch.no_grad(), spied(seen):
        for B, seq in ((4, 1), (2, 40)):  # few tokens over several groups: batched; many tokens, two groups: not
            names = ["default", "b", "c", None][:B] if B == 4 else ["default", "b"]
            with randlora.mixed(model, names):
                model(torch.randn(B, seq, 12))
            assert seen and set(seen) == ({"batched"} if B == 4 else {"grouped"}), seen
            seen.clear()


def test_sparse_batched_pass_is_taken_by_its_cost_rule():
    """Ternary bases wide enough for their non-zeros and token-block copies to pay (density 1/32 at width 1024):
    decode-sized calls share the B_flat product across groups; long calls of two groups, which fill the token
    block, keep the grouped calls; on the 12-wide net (density 0.29) the non-zeros never pay."""
    torch.manual_seed(0)
    wide = Net(d=1024, h=1280, n_layers=1)
    for name in ("default", "b"):
        randlora.inject(wide, TARGETS, r=8, bases="very_sparse", name=name)
    seen = []
    with torch.no_grad(), spied(seen):
        for B, seq, want in ((4, 1, {"batched-sparse"}), (2, 600, {"grouped"})):
            with randlora.mixed(wide, ["default", "b", None, "b"][:B]):
                wide(torch.randn(B, seq, 1024))
            assert set(seen) == want, (B, seq, seen)
            seen.clear()
        with randlora.mixed(cached_model("very_sparse"), ["default", "b", "c", None]):
            cached_model("very_sparse")(torch.randn(4, 1, 12))
        assert set(seen) == {"batched"}, seen


def test_adapters_differ_so_equality_means_something():
    model = cached_model("dense")
    x = torch.randn(1, 3, 12).expand(4, 3, 12).contiguous()
    with torch.no_grad(), randlora.mixed(model, NAMES):
        y = model(x)
    for i in range(4):
        for j in range(i + 1, 4):
            assert (y[i] - y[j]).abs().max() > 1e-3, (NAMES[i], NAMES[j])


@pytest.mark.parametrize("bases", ["dense", "very_sparse"])
@settings(max_examples=25, deadline=None)
@given(names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=7), seq=st.integers(1, 4),
       seed=st.integers(0, 2**16), keep=st.sampled_from([0, 1 << 20]), route=st.sampled_from(ROUTES))
def test_each_row_equals_the_row_run_alone(bases, names, seq, seed, keep, route):
    model = cached_model(bases, torch.float64)
    x = torch.randn(len(names), seq, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    before = untouched(model)
    with torch.no_grad(), forced(model, route, bases):
        with randlora.mixed(model, names, keep_bytes=keep) as state:
            y = model(x)
            y2 = model(x)  # a second call (the kept W + s·ΔW is reused)
        ref = alone(model, names, x)
    torch.testing.assert_close(y, ref, **TOL64)
    torch.testing.assert_close(y2, ref, **TOL64)
    assert state.groups == {n: [i for i, m in enumerate(names) if m == n] for n in set(names) if n is not None}
    named = keep > 0 and any(n is not None for n in names)
    assert state.kept_bytes == 0 or named  # kept only with a budget and an adapter in the batch
    assert_untouched(before, untouched(model))


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
@pytest.mark.parametrize("bases,route", [("dense", "dense"), ("dense", "grouped"), ("very_sparse", "sparse"),
                                         ("very_sparse", "dense"), ("very_sparse", "grouped")])
def test_reduced_precision_rows_are_as_accurate_as_alone(precision, bases, route):
    """A bfloat16 model, or a float32 one under CPU autocast: every no-grad plan of the block is as close to the
    float64 model's rows as the rows run alone in that precision are (each within twice their error)."""
    names = ["default", "b", "c", None, "b", "default"]
    x = torch.randn(len(names), 3, 12, generator=torch.Generator().manual_seed(5))
    model = cached_model(bases, torch.bfloat16 if precision == "bf16" else torch.float32)
    xin = x.to(torch.bfloat16) if precision == "bf16" else x
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()
    with torch.no_grad():
        ref = alone(cached_model(bases, torch.float64), names, x.double())
        with amp:
            with forced(model, route, bases), randlora.mixed(model, names):
                y = model(xin)
            y_alone = alone(model, names, xin)
    assert y.dtype == y_alone.dtype
    err, err_alone = (y.double() - ref).abs().max(), (y_alone.double() - ref).abs().max()
    assert err_alone > 0 and err <= 2 * err_alone, (float(err), float(err_alone))


def test_float32_rows_at_minilm_widths_are_as_accurate_as_alone():
    """At a real model's widths (all-MiniLM-L6-v2's: hidden 384, MLP 1536; every linear layer adapted, two
    full-rank adapters, 8 rows of 64 tokens) float32 rounding differs between a row computed in the batch and
    alone, so the bound is relative: each mixed row is as close to the float64 model's row as the row run alone
    in float32 is (within twice its error), and both within 1e-5 of the largest output."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=2,
                                  num_attention_heads=12, vocab_size=1000)
    model = transformers.BertModel(cfg).eval()
    randlora.inject(model, "all-linear", r=32)
    randlora.inject(model, "all-linear", r=32, name="b")
    for seed, name in enumerate(["default", "b"], 1):
        randomize(model, seed, name)
    names = ["default", "b", None, "b", "default", None, "b", "default"]
    ids = torch.randint(0, 1000, (len(names), 64), generator=torch.Generator().manual_seed(1))

    def alone_rows(m):
        return alone(lambda x: m(input_ids=x).last_hidden_state, names, ids, m)

    exact, single = alone_rows(copy.deepcopy(model).double()), alone_rows(model)
    with torch.no_grad(), randlora.mixed(model, names):
        mixed = model(input_ids=ids).last_hidden_state
    scale = exact.abs().max()
    err, err_alone = (mixed.double() - exact).abs().max(), (single.double() - exact).abs().max()
    assert err_alone > 0 and err <= 2 * err_alone, (float(err), float(err_alone))
    assert err <= 1e-5 * scale, (float(err), float(scale))


@pytest.mark.parametrize("grad", [False, True])
def test_a_batch_sorted_by_adapter_is_sliced_not_gathered(grad):
    """Rows sorted by adapter: each group is a view of its rows and the parts are concatenated in order, with no
    gather or scatter by index; interleaved rows are gathered and put back by index. Both equal the rows alone."""
    model = cached_model("dense")
    x = torch.randn(5, 6, 12)  # 6 tokens a row: the calls go group by group
    calls = []

    def counted(name):
        real = getattr(torch.Tensor, name)
        return mock.patch.object(torch.Tensor, name, lambda self, *a: calls.append(name) or real(self, *a))

    for names, gathered in ((["b", "b", "default", "default", None], False), (["b", "default", "b", None, "default"], True)):
        calls.clear()
        with torch.set_grad_enabled(grad), counted("index_select"), counted("index_copy_"):
            with randlora.mixed(model, names):
                y = model(x.clone().requires_grad_(grad))
        assert bool(calls) == gathered, (names, calls)
        with torch.no_grad():
            torch.testing.assert_close(y.detach(), alone(model, names, x), **TOL)


def test_two_dimensional_inputs_and_a_single_adapter_batch():
    model = cached_model("dense")
    x = torch.randn(5, 12)
    for names in (["b", None, "c", "b", "default"], ["c"] * 5, ["b"] * 5):
        with torch.no_grad(), randlora.mixed(model, names):
            y = model(x)
        torch.testing.assert_close(y, alone(model, names, x), **TOL)


def test_all_none_batch_is_the_base_model():
    model = cached_model("dense")
    x = torch.randn(3, 2, 12)
    with torch.no_grad():
        with randlora.mixed(model, [None, None, None]):
            y = model(x)
        with randlora.disabled(model):
            base = model(x)
    assert torch.equal(y, base)


def test_a_layer_without_the_adapter_leaves_its_rows_at_the_base():
    model = cached_model("dense")
    x = torch.randn(2, 12)
    layer = model.layers[1].q_proj  # "c" is not on it
    assert layer.adapter("c") is None
    with torch.no_grad(), randlora.mixed(model, ["c", "b"]):
        y = layer(x)
    with torch.no_grad(), randlora.disabled(model):
        base = layer(x)
    randlora.use(model, "b")
    with torch.no_grad():
        yb = layer(x[1:])
    randlora.use(model, "default")
    assert torch.equal(y[0], base[0])
    torch.testing.assert_close(y[1:], yb, **TOL)


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def _grads(model):
    out = {}
    for path, layer in adapted_layers(model):
        for name in ("default", "b", "c"):
            ad = layer.adapter(name)
            if ad is not None:
                for w, p in (("lambda", ad.randlora_lambda), ("gamma", ad.randlora_gamma)):
                    out[(path, name, w)] = None if p.grad is None else p.grad.clone()
    return out


def _zero(model):
    for p in model.parameters():
        p.grad = None


@pytest.mark.parametrize("names", [["b", None, "default", "b", None], ["c", "b", "c"], ["default"] * 3,
                                   ["b", "b", "default", None, None]])  # (the last sorted by adapter: sliced)
def test_training_gradients_reach_each_rows_own_adapter_only(names):
    model = served().double().train()  # float64: see TOL64
    g = torch.Generator().manual_seed(7)
    x = torch.randn(len(names), 3, 12, generator=g, dtype=torch.float64)
    w = torch.randn(len(names), 3, 5, generator=g, dtype=torch.float64)

    _zero(model)
    xm = x.clone().requires_grad_(True)
    with randlora.mixed(model, names):
        loss = (model(xm) * w).sum()
    loss.backward()
    got, gx = _grads(model), xm.grad

    _zero(model)
    xr = x.clone().requires_grad_(True)
    for i, name in enumerate(names):
        if name is None:
            with randlora.disabled(model):
                (model(xr[i:i + 1]) * w[i:i + 1]).sum().backward()
        else:
            randlora.use(model, name)
            (model(xr[i:i + 1]) * w[i:i + 1]).sum().backward()
    randlora.use(model, "default")
    want = _grads(model)

    torch.testing.assert_close(gx, xr.grad, **TOL64)
    assert got.keys() == want.keys()
    present = set(names) - {None}
    for key in got:
        if key[1] in present:
            assert got[key] is not None and got[key].abs().max() > 0, key
            torch.testing.assert_close(got[key], want[key], **TOL64)
        else:  # an adapter with no row in the batch gets no gradient
            assert got[key] is None and want[key] is None, key


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw-foreach"])
def test_activation_checkpointing_inside_the_block_and_refused_outside(reentrant, optimizer):
    """Checkpointed forward with backward inside the block: the gradients and one optimiser step equal the
    uncheckpointed block's. Backward after the block would recompute every row with the active adapter: it is
    refused, naming the fix; the next (plain, checkpointed) training step works as usual."""
    names = ["b", "default", None, "c", "b"]
    x = torch.randn(len(names), 3, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def step(ckpt: bool):
        model = served().double().train()
        params = randlora.trainable_parameters(model)
        opt = (torch.optim.SGD(params, lr=0.1) if optimizer == "sgd"
               else torch.optim.AdamW(params, lr=1e-2, foreach=True))
        xi = x.clone().requires_grad_(reentrant)
        with randlora.mixed(model, names):
            y = checkpoint(model, xi, use_reentrant=reentrant) if ckpt else model(xi)
            (y ** 2).sum().backward()
        opt.step()
        return model, {k: v.detach().clone() for k, v in model.state_dict().items() if "randlora_" in k}

    _, want = step(False)
    model, got = step(True)
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], **TOL64)
    with randlora.mixed(model, names):
        y = checkpoint(model, x.clone().requires_grad_(reentrant), use_reentrant=reentrant)
    with pytest.raises(StateError, match=r"re-run during backward after a randlora.mixed.*inside the"):
        (y ** 2).sum().backward()
    model.zero_grad()
    checkpoint(model, x.clone().requires_grad_(reentrant), use_reentrant=reentrant).sum().backward()
    assert all(p.grad is not None for p in randlora.trainable_parameters(model)[:2])


def test_training_with_dropout_keeps_gradients_per_adapter():
    model = served(dropout=0.5).train()
    x = torch.randn(4, 3, 12)
    with randlora.mixed(model, ["b", None, "b", None]):
        model(x).square().sum().backward()
    g = _grads(model)
    assert all(v is None for k, v in g.items() if k[1] != "b")
    assert all(v is not None and v.abs().max() > 0 for k, v in g.items() if k[1] == "b")


# ------------------------------------------------------------------------------------------------
# generate() with the KV cache
# ------------------------------------------------------------------------------------------------
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    conf = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(conf).eval()
    randlora.inject(model, "all-linear", r=8)
    randlora.inject(model, "all-linear", r=8, name="b")
    randlora.inject(model, ["q_proj", "v_proj"], r=8, name="c")
    for seed, name in enumerate(["default", "b", "c"], 1):
        randomize(model, seed, name)
    return model


def _generate(model, ids, **kw):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=0, eos_token_id=None, **kw)
    return out[:, ids.shape[1]:]


def test_generate_each_row_decodes_with_its_own_adapter():
    model = tiny_llama()
    names = ["b", None, "c", "default", "b"]
    ids = torch.randint(3, 64, (len(names), 5), generator=torch.Generator().manual_seed(3))
    before = untouched(model)
    with torch.no_grad(), randlora.mixed(model, names):
        got = _generate(model, ids)
    assert_untouched(before, untouched(model))
    want = []
    for i, name in enumerate(names):
        if name is None:
            with torch.no_grad(), randlora.disabled(model):
                want.append(_generate(model, ids[i:i + 1]))
        else:
            randlora.use(model, name)
            with torch.no_grad():
                want.append(_generate(model, ids[i:i + 1]))
    randlora.use(model, "default")
    want = torch.cat(want)
    assert torch.equal(got, want)
    # the adapters change what is generated (else the equality says nothing)
    with torch.no_grad(), randlora.mixed(model, [None] * len(names)):
        base = _generate(model, ids)
    assert not torch.equal(base[0], got[0]) and not torch.equal(base[3], got[3])


def test_generate_inside_frozen_base_cache_is_one_matmul_per_layer_after_the_first_call(monkeypatch):
    """``cached(model, frozen_base=True)`` around ``generate()``: the prompt's call builds each kept matrix on the
    routed path, every decode step after it is armed (no route planned); tokens equal the unmerged model's and
    logits the default cache mode's bit for bit; no parameter is written."""
    from randlora import core

    model = tiny_llama()
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    before = untouched(model)
    with torch.no_grad():
        want = _generate(model, ids)
        with randlora.cached(model):
            logits = model(ids).logits
        planned, real = [], core.call
        monkeypatch.setattr(core, "call", lambda *a, **k: planned.append(1) or real(*a, **k))
        with randlora.cached(model, frozen_base=True):
            got = _generate(model, ids)
            assert len(planned) == 14  # the 14 adapted layers, once: the prompt's call
            assert torch.equal(model(ids).logits, logits) and len(planned) == 14
    assert torch.equal(got, want)
    assert_untouched(before, untouched(model))
    with torch.no_grad(), randlora.disabled(model):
        assert not torch.equal(_generate(model, ids), got)  # the adapter changes the tokens


# ------------------------------------------------------------------------------------------------
# refusals: cause first, the fix, the model as it was
# ------------------------------------------------------------------------------------------------
def test_a_batch_of_another_length_is_refused_at_the_first_layer_and_the_model_restored():
    model = served().eval()
    before = untouched(model)
    x = torch.randn(3, 12)
    ref = model(x)
    with pytest.raises(randlora.ConfigError, match=r"got 2 adapter names .* 'layers\.0\.q_proj' .* \(3 rows"):
        with randlora.mixed(model, ["b", None]):
            model(x)
    assert_untouched(before, untouched(model))
    assert torch.equal(model(x), ref)


@pytest.mark.parametrize("names, err, match", [
    (["b", "nope"], randlora.StateError, r"no adapter 'nope'; its adapters are \['default', 'b', 'c'\]"),
    ("b", randlora.ConfigError, "names must be a list or tuple"),
    ([], randlora.ConfigError, "names is empty"),
    (["b", 3], randlora.ConfigError, "adapter names .* got 3"),
])
def test_bad_names_are_refused_at_entry(names, err, match):
    model = served().eval()
    before = untouched(model)
    with pytest.raises(err, match=match):
        with randlora.mixed(model, names):
            raise AssertionError("the block must not run")
    assert_untouched(before, untouched(model))


def test_a_merged_model_is_refused():
    model = served().eval()
    randlora.merge(model, unload=False, name="b")
    before = untouched(model)
    with pytest.raises(randlora.StateError, match=r"the model is merged .* randlora\.unmerge\(model\)"):
        with randlora.mixed(model, ["b"]):
            pass
    assert_untouched(before, untouched(model))


def test_nested_blocks_and_errors_inside_the_block():
    model = served().eval()
    before = untouched(model)
    with randlora.mixed(model, ["b"]):
        with pytest.raises(randlora.StateError, match="already inside randlora.mixed"):
            with randlora.mixed(model, ["c"]):
                pass
    assert_untouched(before, untouched(model))
    with pytest.raises(RuntimeError, match="boom"):
        with randlora.mixed(model, ["b", "c"]):
            raise RuntimeError("boom")
    assert_untouched(before, untouched(model))
    with randlora.mixed(model, ["c"]):  # usable again
        pass


@pytest.mark.parametrize("names,seq,kept,why", [
    # two groups going group by group: a kept W + s·ΔW replaces each group's frozen matmul at no extra cost
    (["default", "b"], 6, 2, "keep default: yes, by cost"),
    # single-token groups and a base row take the batched pass, which keeps all or none; the groups' own
    # matmuls, row copies and per-group overhead cost more than the pass: none kept
    (["default", "b", "c", None], 1, 0, "keep every group: no, by cost"),
    # one group of every row: its kept matmul replaces the frozen one and the pass
    (["default"] * 3, 1, 1, "keep every group: yes, by cost"),
])
def test_keep_bytes_keeps_what_its_plan_says(names, seq, kept, why):
    model = cached_model("dense")
    x = torch.randn(len(names), seq, 12)
    plans = []
    real = Mixed.plan

    def spy(self, layer, xs, present=None, cd=None):
        plans.append((layer, real(self, layer, xs, present, cd)))
        return plans[-1][1]

    with torch.no_grad(), mock.patch.object(Mixed, "plan", spy), \
            randlora.mixed(model, names, keep_bytes=1 << 20) as state:
        y = model(x)
    assert all(len(p.keep) == kept and why in p.explain() for _, p in plans), [p.explain() for _, p in plans]
    assert state.kept_bytes == sum(4 * l.out_features * l.in_features * len(p.keep) for l, p in plans)
    torch.testing.assert_close(y, alone(model, names, x), **TOL)


def test_keep_bytes_budget_is_respected():
    model = served().eval()
    x = torch.randn(3, 5, 12)  # 5 tokens per group: a kept W + s·ΔW pays (see test_each_row_equals_the_row_run_alone)
    one = 12 * 12 * 4  # the smallest kept W + s·ΔW (q_proj)
    with torch.no_grad(), randlora.mixed(model, ["b", "default", "c"], keep_bytes=one) as state:
        y = model(x)
    assert 0 < state.kept_bytes <= one
    torch.testing.assert_close(y, alone(model, ["b", "default", "c"], x), **TOL)
    with torch.no_grad(), randlora.mixed(model, ["b", None], keep_bytes=1 << 30) as state:
        model(x[:2])
        kept = state.kept_bytes
        randomize(model, 9, "b")  # λ/γ change inside the block (a reload): the kept W + s·ΔW is rebuilt
        y = model(x[:2])
    assert kept > 0 and state.kept_bytes == kept
    torch.testing.assert_close(y, alone(model, ["b", None], x[:2]), **TOL)
    with randlora.mixed(model, ["b"], keep_bytes=1 << 30) as state:  # grad mode: nothing kept
        model(torch.randn(1, 12))
    assert state.kept_bytes == 0
    with pytest.raises(randlora.ConfigError, match="keep_bytes"):
        with randlora.mixed(model, ["b"], keep_bytes=-1):
            pass


# ------------------------------------------------------------------------------------------------
# the benchmark's smoke run
# ------------------------------------------------------------------------------------------------
def test_serving_benchmark_quick(tmp_path):
    mod = load_benchmark("serving")
    out = tmp_path / "serving.json"
    mod.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["rows"] and all(r["mixed_ms"] > 0 and r["separate_ms"] > 0 for r in data["rows"])
    assert data["load"]["per_adapter_ms"] > 0 and data["load"]["adapters"] >= 2
    assert all(r["max_diff"] < 1e-4 for r in data["rows"])  # the timed mixed batch computes the right thing


def test_serving_benchmark_profile_quick(capsys):
    mod = load_benchmark("serving")
    mod.main(["--quick", "--profile"])
    out = capsys.readouterr().out
    assert out.count("self CPU ms per forward") == 2  # B = 8, K = 1 and 4
    rows = [line.split("|")[1:-1] for line in out.splitlines()
            if line.startswith(("| mixed", "| separate", "| frozen"))]
    assert [r[0].strip() for r in rows] == ["mixed", "separate", "frozen", "frozen, K parts"] * 2
    assert all(float(r[-1]) > 0 for r in rows)  # every variant ran under the profiler
