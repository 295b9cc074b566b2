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
    model = make()
    save_file({f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "base.safetensors"))
    randlora.inject(model, ["q_proj"], r=4, alpha=8)
    perturb(model)
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=False)
    randlora.merge(model)
    cmd = [sys.executable, "-m", "randlora", "merge", "--base", str(tmp_path / "base.safetensors"),
           "--adapter", str(tmp_path / "ad.safetensors"), "--out", str(tmp_path / "m.safetensors")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "--prefix" in res.stderr and "layers.0.q_proj.weight" in res.stderr
    assert not (tmp_path / "m.safetensors").exists()
    res = subprocess.run(cmd + ["--prefix", "model."], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "merged 2 layers" in res.stdout
    assert_same_file_as(tmp_path / "m.safetensors", {f"model.{k}": v for k, v in model.state_dict().items()})


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
