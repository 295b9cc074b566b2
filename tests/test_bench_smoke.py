"""Smoke test of the op benchmark: it runs, picks a route per shape and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_op_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "op.json"
    _load("op").main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4
    for row in data["rows"]:
        assert set(row["median"]) >= {"base", "auto", "weight", "activation"}
        assert all(t > 0 for t in row["median"].values())
        assert row["floor"] >= 1.0
    small_T = [r for r in data["rows"] if r["T"] == 16]
    assert all(r["route"].startswith("activation") for r in small_T)  # few tokens: activation space
    assert "| O×I |" in capsys.readouterr().out
