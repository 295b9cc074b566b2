"""Command line: ``merge`` equals ``randlora.merge`` on the module, ``inspect`` shows what the file holds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import randlora
from randlora.__main__ import main


class Conv1D(nn.Module):
    """GPT-2 style: weight stored (in, out) (recognised by class name)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(24, 24)
        self.up_proj = nn.Linear(24, 40)
        self.down_proj = nn.Linear(40, 24, bias=False)
        self.norm = nn.LayerNorm(24)

    def forward(self, x):
        return self.norm(self.down_proj(torch.relu(self.up_proj(self.q_proj(x)))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def make(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Net().to(dtype)


def perturb(model):
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in randlora.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.3)


def write_base(model, path):
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"note": "kept"})


def assert_same_file_as(path, want: dict):
    got = load_file(str(path))
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


@pytest.mark.parametrize("save_projection", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bases,bias", [("dense", "none"), ("sparse", "randlora_only"), ("very_sparse", "all")])
def test_merge_file_equals_module_merge(tmp_path, save_projection, dtype, bases, bias):
    model = make(dtype)
    write_base(model, tmp_path / "base.safetensors")
    randlora.inject(model, ["q_proj", "up_proj", "down_proj"], r=6, alpha=12, bases=bases, bias=bias, seed=3)
    perturb(model)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=save_projection)
    randlora.merge(model)
    rc = main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "ad.safetensors"),
               "--out", str(tmp_path / "merged.safetensors")])
    assert rc == 0
    assert_same_file_as(tmp_path / "merged.safetensors", model.state_dict())
    before = load_file(str(tmp_path / "base.safetensors"))
    assert not torch.equal(before["layers.0.up_proj.weight"], model.layers[0].up_proj.weight.detach())
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as f:
        assert f.metadata() == {"note": "kept"}


def test_merge_peft_folder_and_conv1d(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential()
    model.add_module("attn", Conv1D(36, 12))  # O=36 > I=12
    model.add_module("proj", Conv1D(12, 36))  # O < I
    write_base(model, tmp_path / "base.safetensors")
    randlora.inject(model, ["attn", "proj"], r=5, alpha=10, recipe="peft", bias="randlora_only")
    perturb(model)
    randlora.save_peft(model, tmp_path / "peft", save_projection=False)
    randlora.save(model, tmp_path / "ours.safetensors", save_projection=False)
    randlora.merge(model)
    for adapter in (tmp_path / "peft", tmp_path / "ours.safetensors"):
        out = tmp_path / f"merged_{adapter.name}.safetensors"
        assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(adapter),
                     "--out", str(out)]) == 0
        assert_same_file_as(out, model.state_dict())


def test_merge_peft_folder_with_portable_bases(tmp_path):
    model = make()
    write_base(model, tmp_path / "base.safetensors")
    randlora.inject(model, ["up_proj", "down_proj"], r=8, alpha=16)
    perturb(model)
    randlora.save_peft(model, tmp_path / "peft")  # portable bases, padded to peft's sizing
    randlora.merge(model)
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "peft"),
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    assert_same_file_as(tmp_path / "m.safetensors", model.state_dict())


def test_module_entry_point_and_prefix(tmp_path):
    """The file's keys carry a prefix the adapter's paths lack: found without --prefix, and the output says so;
    ``--prefix TO`` still adds TO, as before."""
    model = make()
    save_file({f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "base.safetensors"))
    randlora.inject(model, ["q_proj"], r=4, alpha=8)
    perturb(model)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=False)
    randlora.merge(model)
    want = {f"model.{k}": v for k, v in model.state_dict().items()}
    cmd = [sys.executable, "-m", "randlora", "merge", "--base", str(tmp_path / "base.safetensors"),
           "--adapter", str(tmp_path / "ad.safetensors"), "--out", str(tmp_path / "m.safetensors")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "merged 2 layers" in res.stdout and "the prefix 'model.' added" in res.stdout
    assert f"adapter file {tmp_path / 'ad.safetensors'}" in res.stdout
    assert_same_file_as(tmp_path / "m.safetensors", want)
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "ad.safetensors"),
                 "--out", str(tmp_path / "m2.safetensors"), "--prefix", "model."]) == 0
    assert_same_file_as(tmp_path / "m2.safetensors", want)


# ------------------------------------------------------------------------------------------------
# path matching: an adapter trained on a wrapper, merged into the wrapped model's own weight file
# ------------------------------------------------------------------------------------------------
class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Block(), Block()])


class Encoder(nn.Module):
    """A bare encoder: its own weight file has keys ``encoder.layer.N...``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 24)
        self.encoder = Stack()


class Wrapper(nn.Module):
    """A task model around the encoder: its adapter's paths are ``encoder.encoder.layer.N...``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(24, 3)


def wrapper_case(tmp_path, bias="randlora_only"):
    """The bare encoder's weight file, an adapter trained on the wrapper, and the encoder's merged weights."""
    torch.manual_seed(0)
    model = Wrapper()
    write_base(model.encoder, tmp_path / "encoder.safetensors")
    randlora.inject(model, ["q_proj", "up_proj"], r=4, alpha=8, bias=bias)
    perturb(model)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=False)
    randlora.merge(model)
    return tmp_path / "encoder.safetensors", tmp_path / "ad.safetensors", model.encoder.state_dict()


def test_merge_maps_a_wrapper_adapter_onto_the_bare_model_file(tmp_path, capsys):
    base, ad, want = wrapper_case(tmp_path)
    assert sorted(randlora.checkpoint.read_file(ad)[0])[0].startswith("encoder.encoder.layer.0.")
    assert main(["merge", "--base", str(base), "--adapter", str(ad), "--out", str(tmp_path / "auto.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "merged 4 layers (randlora adapter) and 4 biases" in out and "the prefix 'encoder.' stripped" in out
    assert_same_file_as(tmp_path / "auto.safetensors", want)
    # the explicit override gives the same file
    assert main(["merge", "--base", str(base), "--adapter", str(ad), "--out", str(tmp_path / "explicit.safetensors"),
                 "--prefix", "encoder.="]) == 0
    assert_same_file_as(tmp_path / "explicit.safetensors", want)


def test_export_maps_a_wrapper_adapter_onto_the_bare_model_file(tmp_path, capsys):
    from randlora.export import LORA_WEIGHTS

    torch.manual_seed(0)
    model = Wrapper()
    write_base(model.encoder, tmp_path / "encoder.safetensors")
    randlora.inject(model, ["q_proj", "up_proj"], r=4, alpha=8)
    perturb(model)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=False)
    api = randlora.to_lora(model, rank=3)
    assert main(["export-lora", str(tmp_path / "ad.safetensors"), "--base", str(tmp_path / "encoder.safetensors"),
                 "--out", str(tmp_path / "lora"), "--rank", "3"]) == 0
    assert "the prefix 'encoder.' stripped" in capsys.readouterr().out
    got = load_file(str(tmp_path / "lora" / LORA_WEIGHTS))
    assert len(got) == 2 * len(api.layers) == 8
    for p, l in api.layers.items():  # the written keys keep the adapter's (the wrapper's) paths
        assert p.startswith("encoder.encoder.layer.")
        assert torch.equal(got[f"base_model.model.{p}.lora_A.weight"], l.lora_A)
        assert torch.equal(got[f"base_model.model.{p}.lora_B.weight"], l.lora_B)


def test_path_errors_name_the_cause_first_and_the_fix(tmp_path, capsys):
    base, ad, _ = wrapper_case(tmp_path)
    out = tmp_path / "m.safetensors"
    common = ["merge", "--base", str(base), "--adapter", str(ad), "--out", str(out)]

    # an add-prefix cannot map these paths: the old advice ("Use --prefix", which only added) is gone
    assert main([*common, "--prefix", "encoder."]) == 1
    err = capsys.readouterr().err
    assert err.startswith("randlora: error: 4 of the adapter's 4 layers are not in the weights of ")
    assert "'encoder.encoder.encoder.layer.0.q_proj'" in err and "--prefix FROM=TO" in err and "--prefix FROM= " in err
    assert len(err) < 1500

    # an explicit FROM=TO that does not fit
    assert main([*common, "--prefix", "decoder.=model."]) == 1
    err = capsys.readouterr().err
    assert "4 of the adapter's 4 layers are not in the weights of" in err and "'decoder.' -> 'model.'" in err

    # no prefix at all maps them: cause first, a few examples and a count, short
    torch.manual_seed(0)
    big = nn.Sequential(*[nn.Linear(8, 8) for _ in range(40)])
    randlora.inject(big, "all-linear", r=2)
    randlora.save(big, tmp_path / "big.safetensors", save_projection=False)
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "big.safetensors"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("randlora: error: the adapter's layers are not this model's")
    assert "the adapter has 39 layers such as '0', '1' and 37 more" in err
    assert "--prefix" not in err and "prefix=(" not in err  # no prefix maps these paths: suggesting one misleads
    assert len(err) < 1500

    # two prefixes map them equally well: both named, nothing chosen
    torch.manual_seed(0)
    two = nn.ModuleDict({"a": Encoder(), "b": Encoder()})
    write_base(two, tmp_path / "two.safetensors")
    torch.manual_seed(0)
    bare = Encoder()
    randlora.inject(bare, ["q_proj"], r=4)
    perturb(bare)
    randlora.save(bare, tmp_path / "bare.safetensors", save_projection=False)
    assert main(["merge", "--base", str(tmp_path / "two.safetensors"), "--adapter", str(tmp_path / "bare.safetensors"),
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "fit the model in 2 ways (the prefix 'a.' added or the prefix 'b.' added)" in err and "--prefix =a." in err
    assert main(["merge", "--base", str(tmp_path / "two.safetensors"), "--adapter", str(tmp_path / "bare.safetensors"),
                 "--out", str(out), "--prefix", "=b."]) == 0
    merged = load_file(str(out))
    before = load_file(str(tmp_path / "two.safetensors"))
    assert torch.equal(merged["a.encoder.layer.0.q_proj.weight"], before["a.encoder.layer.0.q_proj.weight"])
    assert not torch.equal(merged["b.encoder.layer.0.q_proj.weight"], before["b.encoder.layer.0.q_proj.weight"])


def test_merge_refuses_trained_biases_the_file_lacks(tmp_path, capsys):
    """bias="all" trains the wrapper's head bias too; the encoder's file has no place for it."""
    base, ad, _ = wrapper_case(tmp_path, bias="all")
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--base", str(base), "--adapter", str(ad), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("randlora: error: 1 of the adapter's ")
    assert "trained biases has no tensor in" in err and "'head.bias'" in err and "prefix 'encoder.' stripped" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# outputs: never replaced without --force, atomically with it
# ------------------------------------------------------------------------------------------------
def test_merge_refuses_an_existing_out_without_force(tmp_path, capsys):
    model = make()
    write_base(model, tmp_path / "base.safetensors")
    randlora.inject(model, ["q_proj"], r=4, alpha=8)
    perturb(model)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=False)
    randlora.merge(model)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    cmd = ["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "ad.safetensors"),
           "--out", str(out)]
    assert main(cmd) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"randlora: error: --out {out} already exists") and "--force" in err
    assert out.read_bytes() == b"precious"
    assert main([*cmd, "--force"]) == 0
    assert_same_file_as(out, model.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad.safetensors", "base.safetensors", "m.safetensors"]
    # --force on a failing merge leaves the existing file as it was
    before = out.read_bytes()
    assert main([*cmd, "--force", "--prefix", "nope.="]) == 1
    assert out.read_bytes() == before
    # a folder is never replaced by a file
    (tmp_path / "dir").mkdir()
    assert main([*cmd[:-1], str(tmp_path / "dir"), "--force"]) == 1
    assert "is a folder" in capsys.readouterr().err and (tmp_path / "dir").is_dir()


def test_merge_file_refuses_an_existing_out(tmp_path):
    from randlora.__main__ import merge_file
    from randlora.errors import CheckpointError

    model = make()
    write_base(model, tmp_path / "base.safetensors")
    randlora.inject(model, ["q_proj"], r=4)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=False)
    with pytest.raises(CheckpointError, match="already exists; nothing was written. Pass --force"):
        merge_file(tmp_path / "base.safetensors", tmp_path / "ad.safetensors", tmp_path / "base.safetensors")
    merge_file(tmp_path / "base.safetensors", tmp_path / "ad.safetensors", tmp_path / "base.safetensors", force=True)
    assert_same_file_as(tmp_path / "base.safetensors", {k: v.detach() for k, v in make().state_dict().items()})


def test_export_refuses_an_existing_out_without_force(tmp_path, capsys):
    from randlora.export import LORA_CONFIG, LORA_WEIGHTS

    model = make()
    write_base(model, tmp_path / "base.safetensors")
    randlora.inject(model, ["q_proj"], r=4)
    perturb(model)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=False)
    out = tmp_path / "lora"
    cmd = ["export-lora", str(tmp_path / "ad.safetensors"), "--base", str(tmp_path / "base.safetensors"),
           "--out", str(out)]
    assert main([*cmd, "--rank", "2"]) == 0  # a new folder
    first = (out / LORA_WEIGHTS).read_bytes()
    assert main([*cmd, "--rank", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"randlora: error: {out} exists and is not empty") and "--force" in err
    assert (out / LORA_WEIGHTS).read_bytes() == first
    assert main([*cmd, "--rank", "3", "--force"]) == 0
    assert load_file(str(out / LORA_WEIGHTS))["base_model.model.layers.0.q_proj.lora_A.weight"].shape == (3, 24)
    assert json.loads((out / LORA_CONFIG).read_text())["r"] == 3
    assert sorted(p.name for p in out.iterdir()) == [LORA_CONFIG, LORA_WEIGHTS]  # no temporary file left
    assert main([*cmd, "--rank", "2", "--overwrite"]) == 0  # the old spelling still works
    assert json.loads((out / LORA_CONFIG).read_text())["r"] == 2
    (tmp_path / "file").write_text("x")
    assert main([*cmd[:-1], str(tmp_path / "file"), "--rank", "2", "--force"]) == 1
    assert "is not a folder" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"


# ------------------------------------------------------------------------------------------------
# a Trainer checkpoint folder as the adapter
# ------------------------------------------------------------------------------------------------
def test_trainer_checkpoint_folder(tmp_path, capsys):
    from randlora.checkpoint import ADAPTER_FILE

    model = make()
    write_base(model, tmp_path / "base.safetensors")
    randlora.inject(model, ["q_proj", "down_proj"], r=4, alpha=8)
    perturb(model)
    ckpt = tmp_path / "checkpoint-10"
    ckpt.mkdir()
    randlora.save(model, ckpt / ADAPTER_FILE, save_projection=False)
    (ckpt / "trainer_state.json").write_text("{}")
    randlora.merge(model)
    assert main(["inspect", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert f"adapter: {ckpt} (randlora)\nread: {ckpt / ADAPTER_FILE}\n" in text and "4 layers" in text
    assert main(["inspect", "--json", str(ckpt)]) == 0
    assert json.loads(capsys.readouterr().out)["file"] == str(ckpt / ADAPTER_FILE)
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(ckpt),
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    assert f"(adapter file {ckpt / ADAPTER_FILE})" in capsys.readouterr().out
    assert_same_file_as(tmp_path / "m.safetensors", model.state_dict())
    # a folder holding neither kind of adapter
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert main(["inspect", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "holds neither adapter_config.json nor randlora_adapter.safetensors" in err and "'notes.txt'" in err


def test_merge_refuses_a_fingerprint_mismatch(tmp_path):
    model = make()
    write_base(model, tmp_path / "base.safetensors")
    randlora.inject(model, ["q_proj", "up_proj"], r=4, seed=1)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=False)
    # the same adapter applied to a base whose up_proj is wider: other bank shape, other bases
    other = make()
    other.layers[0].up_proj = nn.Linear(24, 40)
    sd = {k: v.detach().contiguous() for k, v in other.state_dict().items()}
    for k in [k for k in sd if "up_proj.weight" in k]:
        sd[k] = torch.zeros(48, 24)
    save_file(sd, str(tmp_path / "wide.safetensors"))
    rc = main(["merge", "--base", str(tmp_path / "wide.safetensors"), "--adapter", str(tmp_path / "ad.safetensors"),
               "--out", str(tmp_path / "m.safetensors")])
    assert rc == 1
    assert not (tmp_path / "m.safetensors").exists()


def test_merge_refuses_other_seed(tmp_path, capsys):
    model = make()
    write_base(model, tmp_path / "base.safetensors")
    randlora.inject(model, ["q_proj"], r=4, seed=1)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=False)
    with safe_open(str(tmp_path / "ad.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    cfg["seed"] = 2
    meta["config"] = json.dumps(cfg)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    rc = main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "bad.safetensors"),
               "--out", str(tmp_path / "m.safetensors")])
    assert rc == 1
    assert "seed: checkpoint 1, model 2" in capsys.readouterr().err


def test_inspect(tmp_path, capsys):
    model = make()
    randlora.inject(model, ["q_proj", "up_proj", "down_proj"], r=6, alpha=12, seed=9, bases="sparse", bias="all")
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=True)
    assert main(["inspect", str(tmp_path / "ad.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "r=6 alpha=12 init=sqrt" in text and "seed=9" in text and "bases=sparse" in text
    assert "fingerprint: version=1 seed=9" in text
    assert "layers.1.down_proj" in text
    lam_gam = sum(l.randlora_lambda.numel() + l.randlora_gamma.numel() for _, l in randlora.walker.adapted_layers(model))
    assert f"6 layers, {lam_gam:,} adapter parameters" in text
    assert main(["inspect", "--json", str(tmp_path / "ad.safetensors")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["adapter_params"] == lam_gam and d["bases_saved"] is True
    bias_params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias"))
    assert d["bias_params"] == bias_params
    fp = randlora.walker.bank_of(model).fingerprint
    assert d["fingerprint"]["checksum"] == f"{fp.checksum & 0xFFFFFFFFFFFFFFFF:016x}"
    assert (d["fingerprint"]["M_g"], d["fingerprint"]["m_g"]) == (fp.M, fp.m)

    randlora.save_peft(model, tmp_path / "peft")
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    text = capsys.readouterr().out
    assert "(peft)" in text and "fingerprint: none" in text and "recipe=peft" in text and "init=peft" in text


def test_inspect_bad_input(tmp_path, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"not a file")
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 1
    assert "not a readable" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])


def test_merge_decodes_only_adapted_tensors(tmp_path, monkeypatch):
    """Streaming: untouched tensors are copied as raw bytes; only adapted weights/biases are decoded."""
    import safetensors

    model = make()
    write_base(model, tmp_path / "base.safetensors")
    randlora.inject(model, ["up_proj"], r=4, alpha=8, bias="randlora_only")
    perturb(model)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=False)
    randlora.merge(model)
    real, decoded = safetensors.safe_open, []

    class Spy:
        def __init__(self, path, *a, **k):
            self._f, self._path = real(path, *a, **k), str(path)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def get_tensor(self, key):
            if self._path.endswith("base.safetensors"):
                decoded.append(key)
            return self._f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "ad.safetensors"),
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    monkeypatch.undo()
    assert sorted(decoded) == sorted(f"layers.{i}.up_proj.{w}" for i in (0, 1) for w in ("weight", "bias"))
    assert_same_file_as(tmp_path / "m.safetensors", model.state_dict())


# ------------------------------------------------------------------------------------------------
# a Trainer folder with parameters trained beside the adapter; the causes of a wrong weight file
# ------------------------------------------------------------------------------------------------
def trainer_folder(tmp_path, model):
    """A checkpoint folder as randlora.hf.RandLoraTrainer writes it for ``model`` adapted on itself, with its
    head trained beside the adapter (EXTRA_FILE, the adapter's root recorded as the model itself)."""
    from randlora.hf import ADAPTER_FILE, EXTRA_FILE, ROOT_KEY

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    randlora.save(model, ckpt / ADAPTER_FILE, save_projection=False)
    with torch.no_grad():
        model.head.weight.mul_(-2.0)
        model.head.bias.add_(1.0)
    head = {k: v.detach().clone().contiguous() for k, v in model.head.state_dict().items()}
    save_file({f"head.{k}": v for k, v in head.items()}, str(ckpt / EXTRA_FILE),
              metadata={"format": "pt", ROOT_KEY: ""})
    return ckpt


def test_merge_from_a_trainer_folder_writes_the_head_trained_beside_the_adapter(tmp_path, capsys):
    from randlora.hf import ADAPTER_FILE

    model = make()
    write_base(model, tmp_path / "base.safetensors")
    write_base(model.layers, tmp_path / "blocks.safetensors")  # the body alone: no place for the head
    randlora.inject(model, ["q_proj", "down_proj"], r=4, alpha=8)
    perturb(model)
    ckpt = trainer_folder(tmp_path, model)
    randlora.merge(model)
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(ckpt), "--out", str(out)]) == 0
    assert "merged 4 layers (randlora adapter) and 2 tensors trained beside it" in capsys.readouterr().out
    assert_same_file_as(out, model.state_dict())  # the trained head included, bit for bit

    # a weight file without the head: refused, saying what the output would lack and how to get it
    out2 = tmp_path / "m2.safetensors"
    cmd = ["merge", "--base", str(tmp_path / "blocks.safetensors"), "--out", str(out2)]
    assert main([*cmd, "--adapter", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"randlora: error: {ckpt / 'randlora_trainable.safetensors'} holds 2 parameters trained "
                          "beside the adapter"), err
    for piece in ("'head.bias', 'head.weight'", "nothing was written", f"--adapter {ckpt / ADAPTER_FILE}",
                  "load_state_dict"):
        assert piece in err, piece
    assert not out2.exists() and len(err) < 1500
    assert main([*cmd, "--adapter", str(ckpt / ADAPTER_FILE)]) == 0  # the adapter alone, as the message says
    capsys.readouterr()

    # a head of another shape in the weight file: refused
    other = make()
    other.head = nn.Linear(24, 7)
    write_base(other, tmp_path / "other.safetensors")
    assert main(["merge", "--base", str(tmp_path / "other.safetensors"), "--adapter", str(ckpt),
                 "--out", str(tmp_path / "m3.safetensors")]) == 1
    assert "2 have other shapes (head.bias is (10,) in the file, (7,) here)" in capsys.readouterr().err


class Tied(nn.Module):
    """A decoder whose output layer a tied model would store only as the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 24)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(24, 10, bias=False)


def test_merge_names_a_tied_output_layer_the_weight_file_lacks(tmp_path, capsys):
    torch.manual_seed(0)
    model = Tied()
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "tied.safetensors"))  # as a tie_word_embeddings=True model is saved
    randlora.inject(model, ["q_proj", "lm_head"], r=4)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=False)
    assert main(["merge", "--base", str(tmp_path / "tied.safetensors"), "--adapter", str(tmp_path / "ad.safetensors"),
                 "--out", str(tmp_path / "m.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"randlora: error: {tmp_path / 'tied.safetensors'} has no weight for the adapter's output "
                          "layer 'lm_head' (looked for 'lm_head.weight'), while its other 2 layers are there "
                          "(the paths as they are)"), err
    assert "tie_word_embeddings=True" in err and "'embed_tokens.weight'" in err and "Untie it first" in err
    assert "prefix" not in err and len(err) < 1500


def test_merge_into_a_shallower_model_names_the_missing_blocks(tmp_path, capsys):
    model = make()
    write_base(model, tmp_path / "base.safetensors")
    deeper = make()
    deeper.layers.extend([Block(), Block()])
    randlora.inject(deeper, ["q_proj", "up_proj"], r=4)
    randlora.save(deeper, tmp_path / "ad.safetensors", save_projection=False)
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "ad.safetensors"),
                 "--out", str(tmp_path / "m.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("randlora: error: the adapter has layers 0-3 of 'layers', the model 0-1 (4 of its 8 layers "
                          "are in blocks the model lacks). Nothing was written."), err
    assert "prefix" not in err
