"""Basis recipes: the portable recipe against an independent pure-Python SplitMix64 reference, golden
checksums, thread/chunk independence in a subprocess, coordinate stability, and the "peft" recipe
bit for bit against the installed peft package."""

from __future__ import annotations

import hashlib
import math
import struct
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import randlora
from randlora import recipes as R
from randlora.errors import ConfigError
from randlora.recipes import MODES, BankShape, bank_shape, generate

MASK = (1 << 64) - 1

# sha256 of A.float32 bytes + B.float32 bytes (row-major) for the portable recipe. These pin the
# algorithm documented in docs/portable-bases.md: any change to them breaks every saved adapter.
GOLDEN = [
    (0, (8, 96, 64), "dense", "542b0f58f53b96307eaac0c33a96c7197cbb71480c53d297342b0910a0e06d37"),
    (12345, (5, 77, 33), "sparse", "2c87a5f051b3eb0ef3ee47a5e3eed52ff1385a6f73f24b36370784422bf269ae"),
    (4611686018427387911, (4, 50, 30), "very_sparse",
     "921405c3edeaa1a275a30a5e9c1c95b2da3bc68be6d3ba3a1108154d118b7f3f"),
    (1, (32, 300, 200), "dense", "6a099b16ff1478a3df881891e614ec60edfb8e688d597f2c11f9f4a2c1d4204f"),
    (99, (16, 130, 129), "sparse", "1df2c763aa5e53f655ecef91affde87ea8e4445005fd9632eebfca37c3d91a9c"),
]


def digest(A: torch.Tensor, B: torch.Tensor) -> str:
    return hashlib.sha256(A.numpy().tobytes() + B.numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# independent reference: straight from the README's description, in Python integers
# --------------------------------------------------------------------------------------------------
def ref_mix64(z: int) -> int:
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def ref_hash(seed: int, tensor: str, index: int) -> int:
    key = ref_mix64(seed ^ ({"A": 0x41, "B": 0x42}[tensor] << 56))
    return ref_mix64(key + (index + 1) * 0x9E3779B97F4A7C15)


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def ref_bf16(x: float) -> float:
    """Round a float32 value to bfloat16, round to nearest, ties to even (on the bit pattern)."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    lower = bits & 0xFFFF
    upper = bits >> 16
    if lower > 0x8000 or (lower == 0x8000 and upper & 1):
        upper += 1
    return struct.unpack("<f", struct.pack("<I", (upper << 16) & 0xFFFFFFFF))[0]


def ref_value(h: int, mode: str, m_g: int) -> float:
    if mode == "dense":
        u = h >> 48
        x = f32((u + 0.5) * 2.0**-15 - 1.0)  # exact
        return ref_bf16(f32(x * f32(math.sqrt(3.0))))
    s = 3.0 if mode == "sparse" else math.sqrt(m_g)
    t = min(int(2.0**64 / (2.0 * s)), 2**63)
    code = -1 if h < t else (1 if h >= 2**64 - t else 0)
    return float(np.float32(code) * np.float32(math.sqrt(s)))


def ref_A(seed: int, mode: str, m_g: int, k: int, j: int) -> float:
    return ref_value(ref_hash(seed, "A", (k << 32) + j), mode, m_g)


def ref_B(seed: int, mode: str, m_g: int, p: int, i: int, k: int) -> float:
    return ref_value(ref_hash(seed, "B", (p << 40) + (i << 20) + k), mode, m_g)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), r=st.integers(1, 9), M=st.integers(1, 60), m_frac=st.floats(0.01, 1.0),
       mode=st.sampled_from(MODES), data=st.data())
def test_portable_matches_independent_reference(seed, r, M, m_frac, mode, data):
    m = max(1, int(M * m_frac))
    shape = BankShape(r=r, M=M, m=m)
    A, B = generate("portable", seed, mode, shape)
    for _ in range(6):
        k, j = data.draw(st.integers(0, r - 1)), data.draw(st.integers(0, m - 1))
        assert A[k, j].item() == ref_A(seed, mode, m, k, j)
        p, i, k = data.draw(st.integers(0, M - 1)), data.draw(st.integers(0, shape.n - 1)), data.draw(st.integers(0, r - 1))
        assert B[p, i, k].item() == ref_B(seed, mode, m, p, i, k)


@pytest.mark.parametrize("seed,shape,mode,expected", GOLDEN)
def test_golden_checksums(seed, shape, mode, expected):
    A, B = generate("portable", seed, mode, BankShape(*shape))
    assert A.dtype == B.dtype == torch.float32
    assert digest(A, B) == expected


def test_other_threads_and_chunking_give_the_same_bits():
    """A subprocess with one torch/NumPy thread, one worker and tiny chunks produces identical bytes."""
    code = textwrap.dedent(
        """
        import hashlib, os, sys, torch
        torch.set_num_threads(1)
        from randlora import recipes as R
        R._workers = lambda: 1
        R._CHUNK = 97
        out = []
        for seed, shape, mode in [(5, (7, 300, 123), "dense"), (6, (9, 211, 150), "sparse"),
                                  (7, (3, 129, 64), "very_sparse")]:
            A, B = R.generate("portable", seed, mode, R.BankShape(*shape))
            out.append(hashlib.sha256(A.numpy().tobytes() + B.numpy().tobytes()).hexdigest())
        print(" ".join(out))
        """
    )
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    mine = []
    for seed, shape, mode in [(5, (7, 300, 123), "dense"), (6, (9, 211, 150), "sparse"),
                              (7, (3, 129, 64), "very_sparse")]:
        mine.append(digest(*generate("portable", seed, mode, BankShape(*shape))))
    assert res.stdout.split() == mine


def test_chunking_in_process_does_not_change_bits(monkeypatch):
    shape = BankShape(r=6, M=257, m=100)
    want = [generate("portable", 11, mode, shape) for mode in MODES]
    monkeypatch.setattr(R, "_CHUNK", 64)  # many work items, rows split across threads
    monkeypatch.setattr(R, "_workers", lambda: 3)
    for (A0, B0), mode in zip(want, MODES):
        A, B = generate("portable", 11, mode, shape)
        assert torch.equal(A, A0) and torch.equal(B, B0)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**40), r=st.integers(1, 8), M1=st.integers(1, 40), dM=st.integers(0, 30),
       m1=st.integers(1, 40), dm=st.integers(0, 30), mode=st.sampled_from(["dense", "sparse"]))
def test_entries_depend_only_on_coordinates(seed, r, M1, dM, m1, dm, mode):
    """A larger bank leaves every entry it shares with a smaller one unchanged."""
    small, big = BankShape(r, M1, m1), BankShape(r, M1 + dM, m1 + dm)
    A1, B1 = generate("portable", seed, mode, small)
    A2, B2 = generate("portable", seed, mode, big)
    assert torch.equal(A2[:, :m1], A1)
    assert torch.equal(B2[:M1, : small.n, :], B1)


def test_very_sparse_density_follows_m_g():
    """The documented exception: very_sparse's s = sqrt(m_g), so its entries change with m_g (not with M_g)."""
    A1, B1 = generate("portable", 3, "very_sparse", BankShape(4, 200, 64))
    A2, B2 = generate("portable", 3, "very_sparse", BankShape(4, 300, 64))
    assert torch.equal(A2, A1) and torch.equal(B2[:200], B1)
    A3, _ = generate("portable", 3, "very_sparse", BankShape(4, 200, 100))
    assert not torch.equal(A3[:, :64], A1)


class TwoProj(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(48, 48)
        self.up_proj = nn.Linear(48, 130)
        self.down_proj = nn.Linear(130, 48)

    def forward(self, x):
        return self.down_proj(self.up_proj(self.q_proj(x)))


@pytest.mark.parametrize("mode", MODES)
def test_q_proj_bases_do_not_depend_on_other_targets(mode):
    """Adapting [q_proj] alone or [q_proj, up_proj] gives q_proj the same bases (and the same update)."""
    torch.manual_seed(0)
    net1, net2 = TwoProj(), TwoProj()
    net2.load_state_dict(net1.state_dict())
    randlora.inject(net1, ["q_proj"], r=8, bases=mode, seed=21)
    randlora.inject(net2, ["q_proj", "up_proj"], r=8, bases=mode, seed=21)
    assert net1.q_proj.bank.shape != net2.q_proj.bank.shape
    for (a1, b1), (a2, b2) in [(net1.q_proj.bank.views(48, 48), net2.q_proj.bank.views(48, 48))]:
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
    with torch.no_grad():
        for l in (net1.q_proj, net2.q_proj):
            l.randlora_lambda.copy_(torch.linspace(-1, 1, l.randlora_lambda.numel()).view_as(l.randlora_lambda))
    assert torch.equal(net1.q_proj.delta_weight(), net2.q_proj.delta_weight())


def test_dense_values_are_bfloat16_exact_with_known_variance():
    A, B = generate("portable", 17, "dense", BankShape(16, 400, 256))
    for t in (A, B):
        assert torch.equal(t.to(torch.bfloat16).float(), t)
    # DENSE_VARIANCE from the reference definition: the 65536 equally likely values
    vals = [ref_value(u << 48, "dense", 1) for u in range(0, 1 << 16)]
    assert sum(vals) == 0.0  # symmetric
    assert abs(R.DENSE_VARIANCE - math.fsum(v * v for v in vals) / len(vals)) < 1e-15
    assert abs(R.DENSE_VARIANCE - 1.0) < 1e-6
    x = B.double().reshape(-1)
    n = x.numel()
    assert abs(x.mean().item()) < 6 * math.sqrt(1.0 / n)
    assert abs(x.var().item() - R.DENSE_VARIANCE) < 6 * math.sqrt(0.8 / n)  # var of x^2 for U(-√3, √3) is 0.8


@pytest.mark.parametrize("mode", ["sparse", "very_sparse"])
def test_ternary_probabilities_and_scale(mode):
    shape = BankShape(8, 3000, 400)
    A, B = generate("portable", 23, mode, shape)
    s = R.sparsity(mode, shape)
    c = float(np.float32(math.sqrt(s)))
    x = B.reshape(-1)
    assert set(torch.unique(x).tolist()) <= {-c, 0.0, c}
    n = x.numel()
    for v in (-c, c):
        p = 1 / (2 * s)
        frac = (x == v).double().mean().item()
        assert abs(frac - p) < 6 * math.sqrt(p * (1 - p) / n)
    assert abs(x.double().pow(2).mean().item() - 1.0) < 6 * math.sqrt((s - 1) / n) + 1e-6


def test_generate_rejects_bad_input():
    with pytest.raises(ConfigError, match="unknown recipe"):
        generate("nope", 0, "dense", BankShape(2, 4, 4))
    with pytest.raises(ConfigError, match="unknown bases mode"):
        generate("portable", 0, "hyper_sparse", BankShape(2, 4, 4))
    with pytest.raises(ConfigError, match="too large"):
        generate("portable", 0, "dense", BankShape(2, 2**24, 4))


def test_bank_shape_sizing_rules():
    layers = [(24, 40), (70, 24)]
    assert bank_shape("peft", 7, layers) == BankShape(7, 70, 40)  # element-wise max (70, 40), then max/min
    assert bank_shape("portable", 7, layers) == BankShape(7, 70, 24)  # what the slices need


# --------------------------------------------------------------------------------------------------
# "peft" recipe against the installed peft
# --------------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, dims: list[tuple[int, int]]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o) for o, i in dims)

    def forward(self, x):
        return x


@settings(max_examples=6, deadline=None)
@given(r=st.integers(1, 12), dims=st.lists(st.tuples(st.integers(3, 90), st.integers(3, 90)), min_size=1, max_size=3),
       seed=st.integers(0, 2**31), mode=st.sampled_from(MODES))
def test_peft_recipe_is_bit_exact_with_peft(r, dims, seed, mode):
    peft = pytest.importorskip("peft", reason="peft is an optional test dependency (pip install -e '.[test]')")
    cfg = peft.RandLoraConfig(r=r, target_modules=[f"layers.{k}" for k in range(len(dims))], projection_prng_key=seed,
                              sparse=mode == "sparse", very_sparse=mode == "very_sparse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(Net(dims), cfg)
    A_p, B_p = pm.base_model.randlora_A["default"], pm.base_model.randlora_B["default"]
    if not (torch.isfinite(A_p).all() and torch.isfinite(B_p).all()):  # all-zero sparse draw: std 0
        with pytest.raises(ConfigError, match="non-finite"):
            generate("peft", seed, mode, bank_shape("peft", r, dims))
        return
    A, B = generate("peft", seed, mode, bank_shape("peft", r, dims))
    assert tuple(A_p.shape) == (A.shape[0], 1, A.shape[1]) and B_p.shape == B.shape
    assert torch.equal(A_p.reshape(A.shape).float(), A)
    assert torch.equal(B_p.float(), B)


@pytest.mark.parametrize("mode", MODES)
def test_peft_recipe_values_are_stored_losslessly(mode):
    """peft's dense bases are bfloat16 values and its sparse ones ternary: files can store them compactly."""
    from randlora.filefmt import decode_bases, encode_bases

    A, B = generate("peft", 5, mode, BankShape(8, 90, 50))
    enc, meta = encode_bases(A, B)
    assert all(t.element_size() * t.numel() <= 2 * x.numel() for t, x in zip(enc.values(), (A, B)))
    decode_bases(enc, meta)
    assert torch.equal(enc["randlora_A"], A) and torch.equal(enc["randlora_B"], B)


# --------------------------------------------------------------------------------------------------
# what checkpoints carry: compact bases, a fingerprint that names what differs
# --------------------------------------------------------------------------------------------------
class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(64, 64)
        self.up_proj = nn.Linear(64, 176)
        self.down_proj = nn.Linear(176, 64)


@pytest.mark.parametrize("mode,bytes_per_entry", [("dense", 2.0), ("sparse", 0.25), ("very_sparse", 0.25)])
def test_file_sizes_follow_the_encoding(tmp_path, mode, bytes_per_entry):
    torch.manual_seed(0)
    net = Wide()
    randlora.inject(net, ["q_proj", "up_proj", "down_proj"], r=8, bases=mode)
    params = sum(p.numel() for p in randlora.trainable_parameters(net))
    bank = randlora.walker.bank_of(net)
    entries = bank.A.numel() + bank.B.numel()
    small = randlora.save(net, tmp_path / "a.safetensors", save_projection=False).stat().st_size
    big = randlora.save(net, tmp_path / "b.safetensors", save_projection=True).stat().st_size
    assert 4 * params <= small <= 4 * params + 64 * 1024
    assert big - small <= bytes_per_entry * entries + 1024
    tensors, _ = randlora.checkpoint.read_file(tmp_path / "b.safetensors")
    assert torch.equal(tensors["randlora_A"], bank.A) and torch.equal(tensors["randlora_B"], bank.B)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_files_hold_the_exact_bases(tmp_path, dtype):
    torch.manual_seed(0)
    net = Wide().to(dtype)
    randlora.inject(net, ["q_proj", "up_proj"], r=8, bases="sparse")
    randlora.save(net, tmp_path / "a.safetensors", save_projection=True)
    tensors, _ = randlora.checkpoint.read_file(tmp_path / "a.safetensors")
    A, B = generate("portable", 0, "sparse", randlora.walker.bank_of(net).shape)
    assert torch.equal(tensors["randlora_A"], A) and torch.equal(tensors["randlora_B"], B)
    other = Wide().to(dtype)
    randlora.load(other, tmp_path / "a.safetensors")  # verified against the fingerprint's checksum


def test_fingerprint_mismatch_names_what_differs():
    def sd_of(targets, **kw):
        torch.manual_seed(0)
        net = Wide()
        randlora.inject(net, targets, r=8, **kw)
        return randlora.state_dict(net, save_projection=False)

    torch.manual_seed(0)
    net = Wide()
    randlora.inject(net, ["q_proj", "up_proj"], r=8, seed=1)
    cases = [
        (sd_of(["q_proj", "up_proj"], seed=2), ["seed: checkpoint 2, model 1", "checksum"]),
        (sd_of(["q_proj", "up_proj"], seed=1, bases="sparse"), ["bases mode: checkpoint 'sparse', model 'dense'"]),
        (sd_of(["q_proj", "up_proj"], seed=1, recipe="peft"), ["recipe: checkpoint 'peft', model 'portable'"]),
    ]
    for sd, says in cases:
        with pytest.raises(randlora.FingerprintMismatch) as info:
            randlora.load_state_dict(net, sd)
        for piece in says:
            assert piece in str(info.value)
    # same settings, same shapes, other bits: only the checksum can tell
    R.register_recipe("portable_flipped", lambda seed, mode, shape: tuple(-t for t in R.portable(seed, mode, shape)))
    try:
        fp = randlora.walker.bank_of(net).fingerprint
        flipped = randlora.Fingerprint(fp.seed, fp.recipe, fp.mode, fp.r, fp.M, fp.m,
                                       randlora.bank.bases_checksum(*generate("portable_flipped", 1, "dense",
                                                                         randlora.walker.bank_of(net).shape)))
        sd = sd_of(["q_proj", "up_proj"], seed=1)
        sd["randlora_fingerprint"] = flipped.to_tensor()
        with pytest.raises(randlora.FingerprintMismatch, match="checksum: checkpoint"):
            randlora.load_state_dict(net, sd)
    finally:
        del R.RECIPES["portable_flipped"]
