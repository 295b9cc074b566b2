"""Smoke tests of the generative task (benchmarks/lm_task.py): the shipped byte-level LM has learned corpus A,
and ``study --quick`` trains every method and writes a table of finite perplexities at equal trainable counts."""

from __future__ import annotations

import json
import math

import pytest

from bench_loader import load_benchmark

pytest.importorskip("transformers", reason="the benchmark's model is a transformers Llama")
pytest.importorskip("peft", reason="the study's LoRA is peft's")
torch = pytest.importorskip("torch")


def _load():
    return load_benchmark("lm_task")


def test_shipped_model_has_learned_prose(one_thread) -> None:
    """The committed weights load, are small, and predict held-out prose far better than a uniform byte model
    (perplexity 256), at the figure pretrain.json recorded."""
    lm = _load()
    weights = lm.MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size < 20e6
    info = json.loads((lm.MODEL_DIR / "pretrain.json").read_text())
    model = lm.load_model()
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    _, held = lm.corpus_a()
    ppl = lm.perplexity(model, lm.to_stream(held))
    assert ppl < 16, ppl  # a uniform byte model is at 256
    assert ppl == pytest.approx(info["heldout_ppl"], rel=1e-3)


def test_corpus_b_splits_by_file() -> None:
    lm = _load()
    assert not set(lm.CORPUS_B_TRAIN) & set(lm.CORPUS_B_HELDOUT)
    train, held = lm.corpus_b()
    assert len(train) == len(lm.CORPUS_B_TRAIN) and len(held) == len(lm.CORPUS_B_HELDOUT)
    assert not set(train) & set(held) and all("def " in t for t in train + held)


def test_study_quick(tmp_path, one_thread, capsys) -> None:
    """Every method trains (or, frozen, not) and is evaluated; LoRA's count equals RandLora's; the runs are
    cached, so a second invocation trains nothing."""
    lm = _load()
    args = ["study", "--quick", "--out", str(tmp_path)]
    assert lm.main(args) == 0
    data = json.loads((tmp_path / "lm_study.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"lora", "randlora", "randlora-wd3", "full", "frozen"}
    for row in rows.values():
        assert len(row["ppl"]) == 1 and math.isfinite(row["ppl"][0]) and 1 < row["ppl"][0] < 256
    assert rows["frozen"]["trainable"] == 0 and not rows["frozen"]["train_loss"]
    assert rows["lora"]["trainable"] == rows["randlora"]["trainable"] == rows["randlora-wd3"]["trainable"] == 17_920
    assert rows["full"]["trainable"] == sum(p.numel() for p in lm.load_model().parameters())
    for m in ("lora", "randlora", "randlora-wd3", "full"):  # training moved the model away from the frozen one
        assert rows[m]["ppl"][0] != rows["frozen"]["ppl"][0] and len(rows[m]["train_loss"]) == 1
    assert rows["randlora"]["minus_lora_nll"] == pytest.approx([rows["randlora"]["nll"][0] - rows["lora"]["nll"][0]])
    assert "| RandLora (defaults) | 17,920 |" in capsys.readouterr().out
    runs = sorted((tmp_path / "lm_runs").glob("*.json"))
    assert len(runs) == 5
    stamps = [p.stat().st_mtime_ns for p in runs]
    assert lm.main(args) == 0
    assert [p.stat().st_mtime_ns for p in runs] == stamps  # resumed from the cache
    assert "seed 0: held-out ppl" not in capsys.readouterr().out
