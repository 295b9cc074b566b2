"""Command line on sharded checkpoints (``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``):
``merge`` writes a sharded folder transformers loads, equal to ``randlora.merge`` on the model; ``export-lora``
reads the shards' headers; outputs are never replaced without ``--force``; bad checkpoints are refused."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import randlora
from randlora.__main__ import main, merge_file
from randlora.errors import CheckpointError

TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny Llama saved in 4+ shards with a tokenizer file beside, its trained-like adapter, the merged model."""
    d = tmp_path_factory.mktemp("sharded")
    model = llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(d / "base", max_shard_size="20KB")
    (d / "base" / "tokenizer.json").write_text('{"kept": true}')
    randlora.inject(model, TARGETS, r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in randlora.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    randlora.save(model, d / "ad.safetensors")
    x = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        adapted = model(x).logits
    randlora.merge(model)
    merged = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return d, x, adapted, merged


def shards(folder):
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")


def read_folder(folder):
    out = {}
    for name in shards(folder):
        out.update(load_file(str(folder / name)))
    return out


@pytest.mark.parametrize("given", ["folder", "index"])
def test_merge_writes_a_sharded_folder_transformers_loads(case, tmp_path, given, capsys):
    d, x, adapted, merged = case
    base = d / "base" if given == "folder" else d / "base" / "model.safetensors.index.json"
    assert len(shards(d / "base")) >= 4
    assert main(["merge", "--base", str(base), "--adapter", str(d / "ad.safetensors"), "--out", str(tmp_path / "m")]) == 0
    assert "merged 9 layers" in capsys.readouterr().out
    out = tmp_path / "m"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (d / "base").iterdir())
    for name in ("model.safetensors.index.json", "config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (d / "base" / name).read_bytes()
    got = read_folder(out)
    assert set(got) == set(merged)
    for k, v in merged.items():  # the same bits as randlora.merge on the model (float32 accumulation)
        assert torch.equal(got[k], v), k
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for name in shards(out):  # each shard holds what the index places in it
        assert set(load_file(str(out / name))) == {k for k, v in index.items() if v == name}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, adapted, atol=1e-5, rtol=0)


def test_shards_without_an_adapted_tensor_are_copied_byte_for_byte(case, tmp_path):
    d = case[0]
    r = merge_file(d / "base", d / "ad.safetensors", tmp_path / "m")
    assert r["layers"] == 9
    index = json.loads((d / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    adapted = {k for k in index if any(f".{t}.weight" in k for t in TARGETS)}
    same = [n for n in shards(d / "base") if (tmp_path / "m" / n).read_bytes() == (d / "base" / n).read_bytes()]
    untouched = [n for n in shards(d / "base") if not any(index[k] == n for k in adapted)]
    assert untouched and sorted(same) == sorted(untouched)


def test_export_lora_reads_a_sharded_checkpoint(case, tmp_path):
    from randlora.export import export_file

    d = case[0]
    single = tmp_path / "single.safetensors"
    save_file(read_folder(d / "base"), str(single))
    a = export_file(d / "ad.safetensors", d / "base", rank=5)
    b = export_file(d / "ad.safetensors", single, rank=5)
    assert sorted(a.layers) == sorted(b.layers) and len(a.layers) == 9
    for p in a.layers:
        assert torch.equal(a.layers[p].lora_A, b.layers[p].lora_A) and torch.equal(a.layers[p].lora_B,
                                                                                   b.layers[p].lora_B)
    assert main(["export-lora", str(d / "ad.safetensors"), "--base", str(d / "base" / "model.safetensors.index.json"),
                 "--out", str(tmp_path / "lora"), "--rank", "5"]) == 0
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def test_merge_folder_refuses_to_overwrite_without_force(case, tmp_path, capsys):
    d = case[0]
    out = tmp_path / "m"
    out.mkdir()
    (out / "precious").write_text("kept")
    cmd = ["merge", "--base", str(d / "base"), "--adapter", str(d / "ad.safetensors"), "--out", str(out)]
    assert main(cmd) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"randlora: error: --out {out} already exists and is not empty") and "--force" in err
    assert [p.name for p in out.iterdir()] == ["precious"]
    assert main([*cmd, "--force", "--prefix", "nope.="]) == 1  # a failing merge leaves the old folder as it was
    assert [p.name for p in out.iterdir()] == ["precious"]
    assert main([*cmd, "--force"]) == 0
    assert "precious" not in {p.name for p in out.iterdir()} and len(shards(out)) == len(shards(d / "base"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind
    (tmp_path / "f").write_text("a file")
    assert main([*cmd[:-1], str(tmp_path / "f"), "--force"]) == 1
    assert "is a file" in capsys.readouterr().err and (tmp_path / "f").read_text() == "a file"


def broken(case, tmp_path, how):
    """A copy of the sharded base broken in one way."""
    base = tmp_path / "base"
    shutil.copytree(case[0] / "base", base)
    index = base / "model.safetensors.index.json"
    names = shards(base)
    if how == "missing shard":
        (base / names[1]).unlink()
    elif how == "other shard":
        t = load_file(str(base / names[1]))
        t.pop(sorted(t)[0])
        save_file(t, str(base / names[1]))
    elif how == "bad index":
        index.write_text("{not json")
    elif how == "no weights":
        for n in names:
            (base / n).unlink()
        index.unlink()
    return base


@pytest.mark.parametrize("how, cause, fix", [
    ("missing shard", "shard files but 1 of them are not in", "Download or copy the whole checkpoint"),
    ("other shard", "does not hold the tensors model.safetensors.index.json places in it (1 missing",
     "save the checkpoint again"),
    ("bad index", "is not a readable safetensors index", "Pass the index save_pretrained wrote"),
    ("no weights", "has no safetensors weights (it holds", "Pass the weight file itself"),
])
def test_bad_checkpoints_are_refused_with_cause_and_fix(case, tmp_path, how, cause, fix, capsys):
    base = broken(case, tmp_path, how)
    out = tmp_path / "m"
    assert main(["merge", "--base", str(base), "--adapter", str(case[0] / "ad.safetensors"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("randlora: error: ") and cause in err and fix in err and len(err) < 1600
    assert err.index(cause) < err.index(fix)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    with pytest.raises(CheckpointError, match="nothing was written"):
        merge_file(base, case[0] / "ad.safetensors", out)


def test_inspect_of_a_model_folder_says_it_is_weights_not_an_adapter(case, capsys):
    d = case[0]
    assert main(["inspect", str(d / "base")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"randlora: error: the folder {d / 'base'} holds neither adapter_config.json")
    assert "it is a model's weights, not an adapter (a command takes those as --base)" in err
    assert main(["inspect", str(d / "ad.safetensors")]) == 0 and "9 layers" in capsys.readouterr().out


def test_merge_into_its_own_folder_with_force(case, tmp_path):
    """--out the base folder itself: refused without --force; with it, replaced once the new folder is complete."""
    d, merged = case[0], case[3]
    base = tmp_path / "base"
    shutil.copytree(d / "base", base)
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        merge_file(base, d / "ad.safetensors", base)
    merge_file(base, d / "ad.safetensors", base, force=True)
    got = read_folder(base)
    assert set(got) == set(merged) and all(torch.equal(got[k], v) for k, v in merged.items())
    assert (base / "tokenizer.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["base"]
