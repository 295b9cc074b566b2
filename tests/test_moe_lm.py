"""Smoke tests of the mixture-of-experts generative task (benchmarks/moe_lm.py): the shipped byte-level Mixtral has
learned corpus A and its experts implementation agrees with ``eager``; ``study --quick`` trains every method at
the matched trainable counts, each adapted run moves the held-out loss, and a second invocation reads the cache."""

from __future__ import annotations

import json
import math

import pytest

from bench_loader import load_benchmark

pytest.importorskip("transformers", reason="the benchmark's model is a transformers Mixtral")
pytest.importorskip("peft", reason="the study's LoRA is peft's")
torch = pytest.importorskip("torch")

# RandLora r=32: 4 bases per 128-wide matrix, λ (32, 4) + γ (4, 128) = 640 values per matrix (per expert).
ATTN_COUNT = 4 * 4 * 640  # 4 layers × q, k, v, o
EXPERTS_COUNT = ATTN_COUNT + 4 * 2 * 4 * 640  # + 4 layers × 2 tensors × 4 experts


def test_shipped_model_has_learned_prose(one_thread) -> None:
    """The committed weights load at the recorded size, the experts hold most of the non-embedding weights,
    ``grouped_mm`` and ``eager`` agree, and held-out prose scores the perplexity pretrain.json recorded."""
    bench = load_benchmark("moe_lm")
    lm = bench.lm
    info = json.loads((bench.MODEL_DIR / "pretrain.json").read_text())
    model = bench.load_model()
    assert model.config._experts_implementation == bench.IMPL == info["experts_implementation"]
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    assert total == info["parameters"] and info["expert_parameters"] > 0.7 * (total - embeddings)
    _, held = lm.corpus_a()
    stream = lm.to_stream(held)
    assert bench.impl_gap(model, lm.windows(stream, torch.arange(0, 4 * lm.SEQ, lm.SEQ))[:, :-1]) < 1e-4
    ppl = lm.perplexity(model, stream)
    assert ppl < 16, ppl  # a uniform byte model is at 256
    assert ppl == pytest.approx(info["heldout_ppl"], rel=1e-3)


def test_study_quick(tmp_path, one_thread, capsys) -> None:
    """Every method trains (frozen does not); LoRA's count equals its RandLora twin's exactly (the rank search
    finds an exact match on this model: tolerance 0); the expert tensors add trainable values; every adapted
    run's held-out loss differs from the frozen model's; the paired differences are the per-seed ones; the
    runs are cached, so a second invocation trains nothing."""
    bench = load_benchmark("moe_lm")
    args = ["study", "--quick", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "moe_lm_study.json").read_text())["rows"]}
    assert set(rows) == set(bench.ORDER)
    for row in rows.values():
        assert len(row["ppl"]) == 1 and math.isfinite(row["ppl"][0]) and 1 < row["ppl"][0] < 256
    assert rows["frozen"]["trainable"] == 0 and not rows["frozen"]["train_loss"]
    assert rows["randlora-attn"]["trainable"] == rows["lora-attn"]["trainable"] == ATTN_COUNT
    assert rows["randlora-experts"]["trainable"] == rows["lora-experts"]["trainable"] == EXPERTS_COUNT
    for m in ("randlora-attn", "lora-attn", "randlora-experts", "lora-experts"):
        assert abs(rows[m]["nll"][0] - rows["frozen"]["nll"][0]) > 1e-4 and len(rows[m]["train_loss"]) == 1
    nll = {m: r["nll"][0] for m, r in rows.items()}
    assert rows["randlora-experts"]["minus_lora_nll"] == pytest.approx([nll["randlora-experts"] - nll["lora-experts"]])
    assert rows["lora-experts"]["minus_attn_nll"] == pytest.approx([nll["lora-experts"] - nll["lora-attn"]])
    assert f"| RandLora, attention + experts | {EXPERTS_COUNT:,} |" in capsys.readouterr().out
    runs = sorted((tmp_path / "moe_lm_runs").glob("*.json"))
    assert len(runs) == 5
    stamps = [p.stat().st_mtime_ns for p in runs]
    assert bench.main(args) == 0
    assert [p.stat().st_mtime_ns for p in runs] == stamps  # resumed from the cache
    assert "seed 0: held-out ppl" not in capsys.readouterr().out
