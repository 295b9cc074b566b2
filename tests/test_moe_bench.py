"""Smoke test of benchmarks/moe_step.py: every kind trains the tiny Mixtral, peft LoRA's rank is the one whose
trainable count is the closest to RandLora's, and the table and JSON are written. The workers run in this
process (a subprocess per kind would import torch, transformers and peft five times)."""

from __future__ import annotations

import json

import pytest

from bench_loader import load_benchmark


def test_moe_step_quick_runs_every_kind_with_matched_lora_rank(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import torch

    bench = load_benchmark("moe_step")
    seen = []

    def in_process(script, cfg):
        seen.append(cfg)
        return json.loads(json.dumps(bench.measure(cfg)))  # what a worker's JSON line carries

    monkeypatch.setattr(bench, "run_worker", in_process)
    out = tmp_path / "moe.json"
    threads = torch.get_num_threads()
    try:  # one thread: tiny steps on a shared machine
        bench.main(["--quick", "--experts-impl", "eager", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    rows = {row["kind"]: row for row in data["rows"]}
    assert list(rows) == list(bench.KINDS) and len(seen) == len(bench.KINDS)
    assert data["impl"] == "eager" and all(r["reps"][0]["impl"] == "eager" for r in rows.values())
    assert all(r["time_s"] > 0 and r["peak_mb"] > 0 for r in rows.values())

    counts, lora_r = data["counts"], data["lora_r"]
    n = {k: r["trainable"] for k, r in rows.items()}
    assert n["randlora"] == counts["randlora"] == n["randlora-vs"]
    assert 0 < n["randlora-attn"] < n["randlora"]  # the expert tensors add trainable values
    assert n["peft-lora"] == counts["peft-lora"] * lora_r
    gap = abs(n["peft-lora"] - n["randlora"])
    assert all(gap <= abs(counts["peft-lora"] * k - n["randlora"]) for k in range(1, 4 * lora_r + 2))
    full = bench.build_model(data["size"])
    assert n["full"] == sum(p.numel() for p in full.parameters())

    text = capsys.readouterr().out
    assert f"peft LoRA (r={lora_r}) {n['peft-lora']:,}" in text and "| randlora-vs |" in text
    assert text.count("1.00×") >= 4  # peft LoRA and full fine-tuning against themselves


def test_moe_eval_quick_compares_every_cached_variant(capsys) -> None:
    """``--eval``: every variant (unmerged, both cache modes, merged) computes the unmerged model's logits (checked
    inside the script) and the table lists each."""
    pytest.importorskip("transformers")
    import torch

    bench = load_benchmark("moe_step")
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--eval", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out
    assert all(f"| {v} |" in table for v in ("base", "unmerged", "cached", "cached frozen_base", "merged"))
