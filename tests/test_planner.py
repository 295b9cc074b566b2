"""The route planner: its choices on cpu and cuda device types checked against counted work (torch's flop
counter on the op, independent of the planner's cost formulas), one plan per call, and plans that explain
themselves."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import randlora
from randlora import costs, ops, planner, sparse
from randlora.costs import DEVICE_COSTS
from randlora.walker import adapted_layers
from randlora.planner import Route, plan_call

LLAMA = [(1024, 1024), (2816, 1024), (1024, 2816)]  # benchmarks/step.py, op.py, sparse_op.py
SMALL = [(40, 24), (24, 40), (20, 12), (12, 20), (16, 10), (10, 16), (64, 32), (4, 64)]  # the tests' layers
FWD = ("weight", "activation")
BWD = [("fused", "G"), ("fused", "act"), ("act", "G"), ("act", "act")]


def _nr(O, I, r):
    return math.ceil(min(O, I) / r) * r


# ------------------------------------------------------------------------------------------------
# the chosen dense route does the fewest counted multiply-adds
# ------------------------------------------------------------------------------------------------
def counted_flops(T, O, I, r, fwd, bwd, kept=False):
    """Multiply-adds torch's flop counter sees for one forward and backward of the op on ``route`` (meta tensors:
    only shapes; the in-place ``addmm_`` the op accumulates with counted as ``addmm``)."""
    n, m, M = math.ceil(min(O, I) / r), min(O, I), max(O, I)
    mk = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    x, W = mk(T, I).requires_grad_(), mk(O, I)
    lam, gam = mk(r, n).requires_grad_(), mk(n, m).requires_grad_()
    route = Route("dense", "kept" if kept else fwd, "fresh" if kept else None, bwd[0], bwd[1])
    inplace = {torch.ops.aten.addmm_: lambda s, a, b, out_shape=None, **kw: 2 * a[0] * a[1] * b[1]}
    with FlopCounterMode(display=False, custom_mapping=inplace) as fc:
        y = ops.RandLoraFunction.apply(x, W, None, lam, gam, mk(r, m), mk(M, n * r), 0.5, route,
                                       mk(O, I) if kept else None)
        y.backward(torch.ones_like(y))
    return fc.get_total_flops() // 2


@pytest.mark.parametrize("O,I", LLAMA + SMALL[:4])
def test_the_chosen_dense_route_does_the_fewest_counted_multiply_adds(O, I):
    r = 32 if O >= 1024 else 4
    for T in (8, 64, 1024, 4096):
        for keep in ("never", "always"):
            route = plan_call(T=T, O=O, I=I, nr=_nr(O, I, r), r=r, keep=keep)
            kept = route.build is not None
            assert kept == (keep == "always")
            cands = [(f, b) for f in FWD for b in BWD] if not kept else [("kept", ("kept", s)) for s in ("G", "act")]
            flops = {c: counted_flops(T, O, I, r, c[0], c[1], kept) for c in cands}
            chosen = (route.forward if not kept else "kept", (route.grad_x, route.grad_S))
            assert flops[chosen] == min(flops.values()), (T, keep, flops, chosen)


def test_keeping_w_plus_delta_follows_the_memory_bound_and_counted_work():
    """``keep="auto"`` keeps ``W + s·ΔW`` only when the kept ``O × I`` is no larger than the saved ``T × I`` input
    (``O <= T``), and then only when the kept route plus one build counts fewer multiply-adds."""
    r = 32
    for (O, I), T in itertools.product(LLAMA, (64, 512, 1024, 4096)):
        route = plan_call(T=T, O=O, I=I, nr=_nr(O, I, r), r=r)
        plain = plan_call(T=T, O=O, I=I, nr=_nr(O, I, r), r=r, keep="never")
        build = max(O, I) * _nr(O, I, r) * min(O, I)
        kept_work = min(counted_flops(T, O, I, r, "kept", ("kept", s), True) for s in ("G", "act")) + build
        plain_work = counted_flops(T, O, I, r, plain.forward, (plain.grad_x, plain.grad_S))
        assert (route.build is not None) == (O <= T and kept_work < plain_work), (O, I, T)
        assert f"O <= {DEVICE_COSTS['cpu'].keep_memory_ratio:g}·T" in route.explain()


# ------------------------------------------------------------------------------------------------
# choices on cpu and cuda
# ------------------------------------------------------------------------------------------------
def test_cpu_choices_for_representative_shapes():
    d = dict(O=1024, I=1024, nr=1024, r=32, device="cpu")
    few = plan_call(T=64, **d)
    assert (few.kind, few.forward, few.build, few.grad_x, few.grad_S) == ("dense", "activation", None, "act", "act")
    assert few.keeps == ("x",)
    many = plan_call(T=8192, **d)
    assert (many.forward, many.build, many.grad_x, many.grad_S) == ("kept", "fresh", "kept", "G")
    assert many.keeps == ("x", "W + s·ΔW")
    assert plan_call(T=8192, grad=False, **d) == Route("dense", "weight", cost=float(1024 ** 3))
    ev = plan_call(T=64, grad=False, cached=True, **d)
    assert (ev.forward, ev.build, ev.grad_x, ev.keeps) == ("kept", "cached", None, ())
    vs = plan_call(T=1024, density=1 / 32, threads=1, **d)
    assert (vs.kind, vs.grad_x, vs.grad_S, vs.block) == ("sparse", "sparse", "sampled", 64)
    assert plan_call(T=1024, density=1 / 32, threads=2, **d).block == 512
    assert plan_call(T=32, density=1 / 32, path="sparse", **d).block is None  # one block holds every token
    assert plan_call(T=1024, density=1 / 32, cached=True, **d).kind == "dense"


def test_cuda_choices_for_representative_shapes():
    d = dict(O=1024, I=1024, nr=1024, r=32, device="cuda")
    assert plan_call(T=64, **d).forward == "activation"  # multiply-add counts: device independent
    assert plan_call(T=8192, **d).build == "fresh"
    vs = plan_call(T=1024, density=1 / 32, path="sparse", **d)
    assert vs.kind == "sparse" and vs.block is None  # no token blocks off the CPU
    # sparse products weighed by the CUDA row: very_sparse does not pay at the step's shapes
    assert plan_call(T=1024, density=1 / 32, **d).kind == "dense"
    assert plan_call(T=1024, density=1 / 32, **{**d, "device": "cpu"}).kind == "sparse"


def test_no_cpu_constant_decides_a_cuda_route(monkeypatch):
    def routes(device):
        out = []
        for (O, I), T, density, cached, keep in itertools.product(LLAMA + SMALL, (8, 64, 1024, 4096),
                                                                    (None, 1 / 32, 1 / 3), (False, True),
                                                                    ("auto", "never")):
            out.append(plan_call(T=T, O=O, I=I, nr=_nr(O, I, 32), r=32, device=device, density=density,
                                 cached=cached, keep=keep, threads=1))
        return out

    cuda, cpu = routes("cuda"), routes("cpu")
    absurd = costs.DeviceCosts(spmm_weight=1e-9, sampled_weight=1e-9, keep_memory_ratio=1e9, keep_reuse_ratio=1e9,
                               token_block=1, token_block_threaded=1, scratch=True, layout_weight=1e-9,
                               layout_weight_threaded=1e-9, gemm_tokens=1, group_overhead=1e-9,
                               build_weight=1e-9, scaled_side=1e9)
    monkeypatch.setitem(DEVICE_COSTS, "cpu", absurd)
    assert routes("cuda") == cuda
    assert routes("cpu") != cpu  # (the patch does reach the CPU's routes)


def test_the_cost_table_says_how_each_constant_was_measured():
    fields = [f.name for f in dataclasses.fields(costs.DeviceCosts) if f.name != "measured_by"]
    for row in DEVICE_COSTS.values():
        assert set(row.measured_by) == set(fields)
        assert all(v.strip() for v in row.measured_by.values())
    cpu = DEVICE_COSTS["cpu"]  # the CPU row: the constants measured on the 2-core CPU
    assert (cpu.spmm_weight, cpu.sampled_weight, cpu.keep_memory_ratio, cpu.keep_reuse_ratio) == (5.0, 5.0, 1.0, 3.0)
    assert (cpu.token_block, cpu.token_block_threaded, cpu.scratch) == (64, 512, True)
    assert not DEVICE_COSTS["cuda"].scratch and DEVICE_COSTS["cuda"].token_block is None
    assert costs.device_costs("mps") is DEVICE_COSTS["cuda"]


# ------------------------------------------------------------------------------------------------
# one plan per call, read by forward and backward
# ------------------------------------------------------------------------------------------------
def _counting(monkeypatch):
    calls = {"plan_call": [], "op_route": 0, "sparse_op_route": 0}
    real = planner.plan_call

    def counted(**k):
        rt = real(**k)
        calls["plan_call"].append(rt)
        return rt

    def refuse(name):
        def f(*a, **k):
            calls[name] += 1
            raise AssertionError(f"{name} called: the op re-planned")
        return f

    monkeypatch.setattr(planner, "plan_call", counted)
    monkeypatch.setattr(planner, "op_route", refuse("op_route"))
    monkeypatch.setattr(planner, "sparse_op_route", refuse("sparse_op_route"))
    return calls


def _model(bases="dense", dropout=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 24))
    randlora.inject(model, "all-linear", r=4, bases=bases, dropout=dropout)
    with torch.no_grad():
        for p in randlora.trainable_parameters(model):
            p.normal_()
    return model


@pytest.mark.parametrize("bases,path", [("dense", "auto"), ("dense", "weight"), ("dense", "activation"),
                                        ("very_sparse", "sparse"), ("sparse", "auto")])
@pytest.mark.parametrize("T", [4, 64])
@pytest.mark.parametrize("mode", ["train", "no_grad", "cached", "dropout"])
def test_each_call_plans_exactly_once(monkeypatch, bases, path, T, mode):
    model = _model(bases, dropout=0.2 if mode == "dropout" else 0.0)
    for _, layer in adapted_layers(model):
        layer.set_path(path)
    calls = _counting(monkeypatch)
    x = torch.randn(T, 24, requires_grad=mode != "no_grad")
    with torch.set_grad_enabled(mode != "no_grad"), (randlora.cached(model) if mode == "cached"
                                                     else contextlib.nullcontext()):
        y = model(x)
        if mode != "no_grad":
            y.square().sum().backward()
    n_layers = len(list(adapted_layers(model)))
    assert n_layers >= 1 and len(calls["plan_call"]) == n_layers  # one call each, backward included
    assert calls["op_route"] == calls["sparse_op_route"] == 0
    kinds = {rt.kind for rt in calls["plan_call"]}
    assert kinds == ({"sparse"} if path == "sparse" and mode != "cached" else kinds)


def test_layer_route_is_the_route_the_call_takes(monkeypatch):
    model = _model()
    layer = model[0]
    calls = _counting(monkeypatch)
    for T in (4, 64, 1000):
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                want = layer.route(T)
                calls["plan_call"].clear()
                layer(torch.randn(T, 24, requires_grad=True))
            assert calls["plan_call"][-1] == want
    with randlora.disabled(model):
        assert layer.route(8) is None


def test_direct_op_calls_plan_once(monkeypatch):
    n = {"op": 0, "sparse": 0}
    real_op, real_sp = planner.op_route, planner.sparse_op_route

    def op(*a, **k):
        n["op"] += 1
        return real_op(*a, **k)

    def sp(*a, **k):
        n["sparse"] += 1
        return real_sp(*a, **k)

    monkeypatch.setattr(planner, "op_route", op)
    monkeypatch.setattr(planner, "sparse_op_route", sp)
    model = _model("very_sparse")
    layer = model[0]
    A, B = layer.views()
    x = torch.randn(2, 5, 24, requires_grad=True)
    lam, gam = layer.randlora_lambda, layer.randlora_gamma
    ops.randlora_linear(x, layer.weight, layer.bias, lam, gam, A, B, layer.scaling).sum().backward()
    ops.RandLoraFunction.apply(x[0], layer.weight, None, lam, gam, A, B, layer.scaling, "weight").sum().backward()
    assert n == {"op": 2, "sparse": 0}
    idx = layer.bank.sparse_index(40, 24)
    sparse.sparse_randlora_linear(x, layer.weight, layer.bias, lam, gam, idx, layer.scaling).sum().backward()
    assert n == {"op": 2, "sparse": 1}


def test_release_workspace_frees_the_dense_and_the_sparse_scratch():
    model = _model("very_sparse")
    with torch.no_grad():
        model[0].set_path("sparse")
        model(torch.randn(300, 24))  # sparse token blocks
        model[0].set_path("weight")
        model(torch.randn(300, 24))  # dense S and W + s·ΔW
    assert {"S", "W", "in", "out"} <= {role for role, _ in ops.workspace()}
    ops.release_workspace()
    assert ops.workspace() == {}


# ------------------------------------------------------------------------------------------------
# plans that explain themselves
# ------------------------------------------------------------------------------------------------
def _listed(line: str) -> dict[str, float]:
    """``{candidate: cost}`` from an explain() line ``what: a 1e+06 (chosen), b 2e+06``."""
    out = {}
    for part in line.split(": ", 1)[1].split(", "):
        words = part.replace(" (chosen)", "").split(" (one matmul")[0].rsplit(" ", 1)
        out[words[0] + (" (chosen)" if "(chosen)" in part else "")] = float(words[1])
    return out


@pytest.mark.parametrize("T", [1, 64, 1024, 8192])
@pytest.mark.parametrize("shape", [(1024, 2816), (2816, 1024), (384, 384)])
@pytest.mark.parametrize("grad", [True, False])
def test_explain_lists_every_candidate_and_the_chosen_one_is_the_cheapest(T, shape, grad):
    O, I = shape
    route = plan_call(T=T, O=O, I=I, nr=_nr(O, I, 32), r=32, grad=grad)
    text = route.explain()
    assert text.splitlines()[0].startswith(f"route: dense, forward {route.forward}")
    lines = {ln[2:].split(":", 1)[0]: ln[2:] for ln in text.splitlines()[1:]}
    assert lines["call"].startswith(f"call: {T} tokens, {O}×{I}")
    fwd = _listed(lines["forward"])
    chosen = [k for k in fwd if k.endswith("(chosen)")]
    assert len(chosen) == 1 and fwd[chosen[0]] == min(fwd.values())
    if route.build is None:  # not prebuilt: both forward routes were weighed, and the cheaper taken
        assert {k.split(" ")[0] for k in fwd} == {"weight", "activation"}
        assert chosen[0].split(" ")[0] == route.forward
    if grad:
        bwd = _listed(lines["backward"])
        chosen = [k for k in bwd if k.endswith("(chosen)")]
        assert len(chosen) == 1 and bwd[chosen[0]] == min(bwd.values()) and len(bwd) >= 2
        assert f"∂x {route.grad_x} / ∂λ∂γ {route.grad_S}" in chosen[0]
        keep = lines["keep W + s·ΔW"]
        # the kept matrix may be at most the saved input (O <= T on the CPU): otherwise memory decides, not cost
        assert ("by the memory bound" in keep) == (O > T)
        assert keep.startswith("keep W + s·ΔW: yes") == (route.build is not None)
    else:
        assert "backward" not in lines and "prebuild W + s·ΔW" in lines


def test_explain_says_why_ternary_bases_go_dense_or_sparse():
    few = plan_call(T=64, O=1024, I=2816, nr=1024, r=32, density=1 / 32)
    many = plan_call(T=8192, O=1024, I=1024, nr=1024, r=32, density=1 / 32)
    forced = plan_call(T=8192, O=1024, I=1024, nr=1024, r=32, density=1 / 32, path="sparse")
    for route, verdict in ((few, "sparse"), (many, "dense"), (forced, "forced by path='sparse'")):
        line = next(ln for ln in route.explain().splitlines() if ln.startswith("- sparse route"))
        sparse, dense = (float(w) for w in line.split(" against the cheapest dense plan's ")[0].rsplit(" ", 1)[1:]
                         + [line.split("plan's ")[1].split(":")[0]])
        assert line.endswith(": " + verdict)
        assert route.kind == ("sparse" if verdict != "dense" else "dense")
        if verdict != "forced by path='sparse'":
            assert (sparse < dense) == (verdict == "sparse")


def test_plan_call_is_memoised_on_its_arguments_and_the_cost_row(monkeypatch):
    args = dict(T=8192, O=1024, I=1024, nr=1024, r=32, density=1 / 32, threads=2)
    first = plan_call(**args)
    assert plan_call(**args) is first  # the same frozen Route, not planned again
    cheap = dataclasses.replace(DEVICE_COSTS["cpu"], spmm_weight=1e-6, sampled_weight=1e-6, layout_weight=1e-6,
                                layout_weight_threaded=1e-6)
    monkeypatch.setitem(DEVICE_COSTS, "cpu", cheap)  # a changed cost row is a new key: planned afresh
    assert plan_call(**args).kind == "sparse" and first.kind == "dense"
