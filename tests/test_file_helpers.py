"""The package's shared file and bank helpers: atomic writes, a layer's bank views, the fingerprint layout."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import randlora
from randlora.__main__ import merge_file
from randlora.bank import FINGERPRINT_KEYS, Fingerprint, layer_views
from randlora.filefmt import atomic_write
from randlora.errors import CheckpointError
from randlora.files import read_adapter, read_for_weights
from randlora.recipes import BankShape, generate, n_bases


def _default_mode() -> int:
    """The permission bits ``open(path, "w")`` gives a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_gives_ordinary_permissions_and_replaces_only_when_done(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write(path, lambda tmp: open(tmp, "wb").write(b"first"))
    assert path.read_bytes() == b"first" and _mode(path) == _default_mode()

    def fail(tmp):
        open(tmp, "wb").write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 12)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _adapted_with_base_file(tmp_path):
    """An adapted ``Net`` and the safetensors file of its weights before adaptation."""
    torch.manual_seed(0)
    model = Net()
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
    randlora.inject(model, ["up", "down"], r=4)
    return model, base


def test_merged_file_has_ordinary_permissions(tmp_path):
    model, base = _adapted_with_base_file(tmp_path)
    adapter = randlora.save(model, tmp_path / "adapter.safetensors")
    merged = tmp_path / "merged.safetensors"
    merge_file(base, adapter, merged)
    # a merged model is often shared with other users of the machine: no owner-only temporary-file mode
    assert _mode(merged) == _default_mode()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("O, I", [(20, 12), (12, 20), (7, 7), (20, 1)])
def test_layer_views_are_the_slices_without_a_copy(O, I):
    r = 3
    shape = BankShape(r=r, M=20, m=12)
    A, B = generate("portable", 1, "dense", shape)
    Av, Bv = layer_views(A, B, O, I, r)
    m, M = min(O, I), max(O, I)
    n = -(-m // r)
    assert torch.equal(Av, A[:, :m])
    # column i·r + k of the flat view is B[:, i, k]
    want = torch.stack([B[:M, i, k] for i in range(n) for k in range(r)], dim=1)
    assert torch.equal(Bv, want)
    assert Av.data_ptr() == A.data_ptr() and Bv.data_ptr() == B.data_ptr()


@pytest.mark.parametrize("m, r, n", [(1, 1, 1), (12, 3, 4), (13, 3, 5), (2, 5, 1)])
def test_n_bases_is_the_ceiling(m, r, n):
    assert n_bases(m, r) == n == BankShape(r=r, M=m, m=m).n


def test_fingerprint_keys_follow_the_stored_tensor():
    fp = Fingerprint(seed=5, recipe="portable", mode="sparse", r=4, M=20, m=13, checksum=-3)
    t = fp.to_tensor()
    assert len(FINGERPRINT_KEYS) == t.numel() == 9
    fields = dict(zip(FINGERPRINT_KEYS, t.tolist()))
    assert (fields["seed"], fields["mode"], fields["r"], fields["M_g"], fields["m_g"], fields["n_g"],
            fields["checksum"]) == (5, 1, 4, 20, 13, 4, -3)
    other = Fingerprint(seed=6, recipe="portable", mode="dense", r=4, M=20, m=13, checksum=-3)
    assert fp.differences(other.to_tensor()) == ["seed: checkpoint 6, model 5",
                                                 "bases mode: checkpoint 'dense', model 'sparse'"]


def test_read_for_weights_matches_the_adapted_model(tmp_path):
    model, base = _adapted_with_base_file(tmp_path)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    fa = read_for_weights(randlora.save(model, tmp_path / "a.safetensors"), base)
    assert fa.layers == ["down", "up"] and fa.shapes == {"up": (20, 12), "down": (12, 20)}
    A, B = fa.bases()
    for path, layer in randlora.walker.adapted_layers(model):
        # same bases, same λ/γ, same op and dtype: the file path must reproduce the module's update exactly
        assert torch.equal(fa.delta(path, A, B, torch.float64), layer.delta_weight(torch.float64))


def test_read_for_weights_maps_paths_by_the_one_rule(tmp_path):
    """The weight file's keys carry a prefix (added automatically), or the adapter's do (stripped); biases
    follow the same mapping; an explicit prefix is used as given."""
    torch.manual_seed(0)
    model = Net()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({f"model.{k}": v for k, v in sd.items()}, str(tmp_path / "prefixed.safetensors"))
    randlora.inject(model, ["up", "down"], r=4, bias="randlora_only")
    adapter = randlora.save(model, tmp_path / "a.safetensors")
    fa = read_for_weights(adapter, tmp_path / "prefixed.safetensors")
    assert (fa.pathmap.strip, fa.pathmap.add) == ("", "model.")
    assert fa.keys == {"up": "model.up.weight", "down": "model.down.weight"}
    assert fa.bias_keys() == {"model.up.bias": "up.bias", "model.down.bias": "down.bias"}
    assert fa.info["file"] == tmp_path / "a.safetensors"
    for prefix in ("model.", "=model.", ("", "model.")):
        assert read_for_weights(adapter, tmp_path / "prefixed.safetensors", prefix).keys == fa.keys
    with pytest.raises(CheckpointError, match="2 of the adapter's 2 layers are not in the weights of"):
        read_for_weights(adapter, tmp_path / "prefixed.safetensors", "other.=")

    # the adapter's paths carry a prefix the file lacks (it was trained on a wrapper): stripped
    torch.manual_seed(0)
    wrapped = nn.Module()
    wrapped.net = Net()
    bare = tmp_path / "bare.safetensors"
    save_file(sd, str(bare))
    randlora.inject(wrapped, ["up", "down"], r=4, bias="randlora_only")
    fw = read_for_weights(randlora.save(wrapped, tmp_path / "w.safetensors"), bare)
    assert (fw.pathmap.strip, fw.pathmap.add) == ("net.", "")
    assert fw.keys == {"net.up": "up.weight", "net.down": "down.weight"}
    assert fw.bias_keys() == {"up.bias": "net.up.bias", "down.bias": "net.down.bias"}


def test_read_adapter_reads_a_trainer_checkpoint_folder(tmp_path):
    from randlora.checkpoint import ADAPTER_FILE

    model, _ = _adapted_with_base_file(tmp_path)
    (tmp_path / "ckpt").mkdir()
    randlora.save(model, tmp_path / "ckpt" / ADAPTER_FILE, save_projection=False)
    tensors, cfg, info = read_adapter(tmp_path / "ckpt")
    assert info == {"format": "randlora", "file": tmp_path / "ckpt" / ADAPTER_FILE}
    assert sorted(tensors) == sorted(randlora.state_dict(model, save_projection=False))
    randlora.save_peft(model, tmp_path / "peft")
    assert read_adapter(tmp_path / "peft")[2]["file"] == tmp_path / "peft" / "adapter_model.safetensors"
    with pytest.raises(CheckpointError, match="does not exist; pass an adapter .safetensors file, a checkpoint"):
        read_adapter(tmp_path / "missing")
