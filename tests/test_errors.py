"""Bad input is refused with a clear ``RandLoraError`` and leaves the model exactly as it was.

``CASES`` is the table of bad inputs (mirrored in docs/errors.md, section "Bad inputs"): each row names the
bad input, the call, the error class and words the message must contain (the offending value and
the fix). One test per row runs the call on a fresh model and then checks, with :func:`snapshot`,
that the refused call changed nothing: same module objects, same parameter objects and
``requires_grad`` flags, same ``state_dict()`` bytes, same buffers (the bank too) and flags.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import randlora
from randlora import CheckpointError, ConfigError, FingerprintMismatch, RandLoraError, StateError, TargetError
from randlora.checkpoint import read_file
from randlora.walker import adapted_layers

from models import randomize


# ------------------------------------------------------------------------------------------------
# the "nothing changed" helper
# ------------------------------------------------------------------------------------------------
def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return bytes(t.view(torch.uint8).numpy().tobytes()) if t.numel() else b""


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a refused call must leave alone (objects by identity, tensors by bytes)."""
    mods = list(model.named_modules(remove_duplicate=False))
    return {
        "modules": [(n, id(m), type(m).__name__) for n, m in mods],
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
        "state_dict": [(k, v.dtype, tuple(v.shape), _bytes(v)) for k, v in model.state_dict().items()],
        "buffers": [(n, id(b), b.dtype, _bytes(b)) for n, b in model.named_buffers(remove_duplicate=False)],
        "flags": [(n, m.training, getattr(m, "merged", None), getattr(m, "disabled", None), getattr(m, "path", None))
                  for n, m in mods],
        "root_attrs": sorted(k for k in vars(model) if not k.startswith("_")),
        "bank": id(getattr(model, "randlora_bank", None)),
    }


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"the refused call changed the model: {changed}"


# ------------------------------------------------------------------------------------------------
# models and fixtures
# ------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + self.mlp(self.norm(self.q_proj(x) + self.v_proj(x)))


class Toy(nn.Module):
    def __init__(self, d: int = 8, h: int = 12, vocab: int = 5) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(d, h) for _ in range(2)])
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        for blk in self.layers:
            x = blk(x)
        return self.head(x)


TARGETS = ["q_proj", "v_proj"]


def toy(d: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> Toy:
    torch.manual_seed(seed)
    return Toy(d).to(dtype)


def injected(model: nn.Module, **kw) -> nn.Module:
    kw.setdefault("r", 4)
    randlora.inject(model, TARGETS, **kw)
    randomize(model, 1)
    return model


def donor_sd(*, d: int = 8, save_projection: bool = False, **kw) -> dict[str, torch.Tensor]:
    """The adapter state dict of another, separately injected model."""
    return {k: v.clone() for k, v in randlora.state_dict(injected(toy(d), **kw), save_projection=save_projection).items()}


def saved(tmp: Path, model: nn.Module | None = None, name: str = "adapter.safetensors", **kw) -> Path:
    path = tmp / name
    randlora.save(model if model is not None else injected(toy(), **kw), path)
    return path


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    what: str                                   # the bad input, as in docs/errors.md
    call: Callable[[nn.Module, Path], Any]       # the refused call
    error: type[RandLoraError]
    says: tuple[str, ...]                        # the message must contain each (offending input, fix)
    prep: Callable[[nn.Module, Path], Any] = field(default=lambda m, tmp: None)
    model: Callable[[], nn.Module] = toy


def _inject(**kw):
    targets = kw.pop("targets", TARGETS)
    return lambda m, tmp: randlora.inject(m, targets, **kw)


def _with_int8_weight() -> nn.Module:
    m = toy()
    lin = m.layers[1].q_proj  # the SECOND target: the first one is fine, nothing may be swapped
    lin.weight = nn.Parameter(lin.weight.detach().round().to(torch.int8), requires_grad=False)
    return m


def _with_zero_layer() -> nn.Module:
    m = toy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Initializing zero-element tensors is a no-op"
        m.layers[1].v_proj = nn.Linear(8, 0, bias=False)
    return m


def _with_tied() -> nn.Module:
    m = toy()
    m.layers[1].q_proj.weight = m.layers[0].q_proj.weight
    return m


def _with_tied_head() -> nn.Module:
    m = toy()
    m.embed = nn.Embedding(5, 8)
    m.embed.weight = m.head.weight
    return m


def _with_alias() -> nn.Module:
    m = toy()
    m.layers[1].q_proj = m.layers[0].q_proj
    return m


def _tiny_peft(m, tmp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: std() of a single element
        return randlora.inject(m, ["0"], r=1, recipe="peft")


def _merged(m, tmp):
    injected(m)
    randlora.merge(m, unload=False)


def _poison(value: float, which: str = "randlora_lambda"):
    def prep(m, tmp):
        injected(m)
        with torch.no_grad():
            getattr(m.layers[1].v_proj, which)[0, 0] = value
    return prep


def _with_duck_quantized() -> nn.Module:
    """``layers.1.q_proj`` holding an int8 weight with ``SCB`` scales, the attributes bitsandbytes' ``Int8Params``
    has and by which randlora recognises an 8-bit layer (bitsandbytes is not needed: the merge refusal is decided
    before any weight is read; tests/test_quantized.py checks the real layers)."""
    m = toy()
    lin = m.layers[1].q_proj
    w = nn.Parameter(lin.weight.detach().mul(127).round().to(torch.int8), requires_grad=False)
    w.SCB = torch.ones(lin.out_features)
    lin.weight = w
    return m


def _overflow_fp16(m, tmp):
    injected(m)
    with torch.no_grad():
        m.layers[0].q_proj.randlora_lambda.fill_(3e4)
        m.layers[0].q_proj.randlora_gamma.fill_(30.0)


def _inject_again(m, tmp):
    kw = {"name": "default"} if "name" in inspect.signature(randlora.inject).parameters else {}
    return randlora.inject(m, TARGETS, r=4, **kw)


def _inject_first(m, tmp):
    kw = {"name": "default"} if "name" in inspect.signature(randlora.inject).parameters else {}
    randlora.inject(m, TARGETS, r=4, **kw)
    randomize(m, 1)


def _drop(key_pattern: str, sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not re.search(key_pattern, k)}


def _corrupt_bases(m, tmp):
    sd = donor_sd(save_projection=True)
    sd["randlora_A"] = sd["randlora_A"].clone()
    sd["randlora_A"][0, 0] += 0.5
    return randlora.load_state_dict(m, sd)


def _flipped(tmp: Path, key_part: str) -> Path:
    """A saved adapter file with one byte of the first tensor whose name contains ``key_part`` flipped."""
    path = saved(tmp)
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    meta = json.loads(bytes(data[8:header]))
    key = next(k for k in sorted(meta) if key_part in k)
    data[header + meta[key]["data_offsets"][0]] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def _truncated(tmp: Path) -> Path:
    path = saved(tmp)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _cut(tmp: Path, drop: int | None) -> Path:
    """A saved adapter without its last ``drop`` bytes (None: all of them)."""
    path = saved(tmp)
    data = path.read_bytes()
    path.write_bytes(b"" if drop is None else data[:-drop])
    return path


class _Bomb:
    """Unpickling this creates ``marker``: proof of whether a loader unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_file(tmp: Path) -> Path:
    path = tmp / "adapter.safetensors"
    torch.save({"layers.0.q_proj.randlora_lambda": torch.zeros(4, 2), "x": _Bomb(tmp / "PWNED")}, path)
    return path


def _not_safetensors(tmp: Path) -> Path:
    path = tmp / "adapter.safetensors"
    path.write_text("this is not a safetensors file\n" * 20)
    return path


def _foreign_safetensors(tmp: Path) -> Path:
    from safetensors.torch import save_file

    path = tmp / "model.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path))
    return path


def _bad_settings(tmp: Path) -> Path:
    from safetensors.torch import save_file

    path = tmp / "adapter.safetensors"
    save_file({"randlora_fingerprint": torch.zeros(9, dtype=torch.int64)}, str(path),
              metadata={"format": "randlora", "version": "1", "config": "{not json"})
    return path


def _empty_dir(tmp: Path) -> Path:
    (tmp / "peft_adapter").mkdir()
    return tmp / "peft_adapter"


def _other_names(tmp: Path) -> Path:
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(8, 8)

    m = Other()
    randlora.inject(m, ["encoder"], r=4)
    return saved(tmp, m)


def _other_container(tmp: Path) -> Path:
    """The toy's blocks under another name (``body.0.q_proj``): only a prefix replaced by another maps them."""
    m = toy()
    m.body = m.layers
    del m.layers
    randlora.inject(m, TARGETS, r=4)
    return saved(tmp, m)


CASES: list[Case] = [
    # -- selection -------------------------------------------------------------------------------
    Case("targets that match nothing", _inject(targets=["q_prj"]), TargetError, ("'q_prj'", "q_proj")),
    Case("a single-string target that is not a full-name regex", _inject(targets="q_proj"), TargetError,
         ("regular expression", "['q_proj']")),
    Case("a target that is not a linear layer", _inject(targets=["mlp"]), TargetError,
         ("layers.0.mlp (Sequential)", "not linear")),
    Case("an empty target list", _inject(targets=[]), TargetError, ("empty", "targets=[")),
    Case("targets of the wrong type (a set)", _inject(targets={"q_proj"}), TargetError, ("{'q_proj'}", "list")),
    Case("targets that are not a valid regex", _inject(targets="q_proj("), TargetError,
         ("'q_proj('", "not a valid regular expression")),
    Case("exclude removing every target", _inject(exclude=["q_proj", "v_proj"]), TargetError,
         ("exclude", "narrow exclude")),
    Case("layers indices that do not exist", _inject(layers=[7]), TargetError, ("[7]", "[0, 1]")),
    Case("an empty layers list", _inject(layers=[]), TargetError, ("layers is empty", "layers=None")),
    Case("exclude of the wrong type", _inject(exclude=5), TargetError, ("exclude must be", "got 5")),
    Case("layers that are not ints", _inject(layers="0"), TargetError, ("'0'", "list of block indices")),
    Case("a target with a zero-size weight", _inject(), TargetError, ("layers.1.v_proj", "(0, 8)", "exclude"),
         model=_with_zero_layer),
    Case("two targets sharing one tied weight", _inject(), TargetError, ("tied", "layers.1.q_proj", "Untie it"),
         model=_with_tied),
    Case("a target whose weight is tied to another module (a head tied to the embedding)",
         _inject(targets=["q_proj", "head"]), TargetError, ("'head'", "'embed.weight'", "tie_word_embeddings=False",
                                                            "exclude=['head']"), model=_with_tied_head),
    Case("adapter dropout on out_proj of nn.MultiheadAttention, in training", lambda m, tmp: m(torch.ones(2, 3, 8)),
         ConfigError, ("out_proj", "dropout=0", "exclude=['out_proj']"),
         prep=lambda m, tmp: randlora.inject(m, ["out_proj"], r=4, dropout=0.1),
         model=lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)),
    Case("a target registered under two names", _inject(), TargetError,
         ("layers.0.q_proj", "layers.1.q_proj", "own module"), model=_with_alias),
    # -- settings --------------------------------------------------------------------------------
    Case("r = 0", _inject(r=0), ConfigError, ("r must be a positive int", "0")),
    Case("r < 0", _inject(r=-3), ConfigError, ("r must be a positive int", "-3")),
    Case("r not an int (2.5)", _inject(r=2.5), ConfigError, ("r must be a positive int", "2.5")),
    Case("r a bool", _inject(r=True), ConfigError, ("r must be a positive int", "True")),
    Case("r larger than every targeted layer's largest side", _inject(r=100_000), ConfigError,
         ("r=100000", "r <= 8")),
    Case("alpha = 0", _inject(alpha=0), ConfigError, ("alpha must be a positive", "got 0")),
    Case("alpha < 0", _inject(alpha=-8.0), ConfigError, ("alpha must be a positive", "-8.0")),
    Case("alpha = inf", _inject(alpha=float("inf")), ConfigError, ("alpha", "finite", "inf")),
    Case("alpha = nan", _inject(alpha=float("nan")), ConfigError, ("alpha", "nan")),
    Case("unknown init", _inject(init="lora"), ConfigError, ("unknown init 'lora'", "sqrt", "peft")),
    Case("dropout = 1", _inject(dropout=1.0), ConfigError, ("dropout", "[0, 1)", "1.0")),
    Case("dropout < 0", _inject(dropout=-0.1), ConfigError, ("dropout", "[0, 1)", "-0.1")),
    Case("unknown bases", _inject(bases="dens"), ConfigError, ("'dens'", "'dense'", "'very_sparse'")),
    Case("unknown recipe", _inject(recipe="pft"), ConfigError, ("'pft'", "'peft'", "'portable'")),
    Case("unknown bias", _inject(bias="lora_only"), ConfigError, ("'lora_only'", "'randlora_only'")),
    Case("a negative seed", _inject(seed=-1), ConfigError, ("seed", "-1", "[0, 2**63)")),
    Case("bases the recipe cannot make (peft, a 1×1 layer)", _tiny_peft, ConfigError,
         ("'peft'", "non-finite", "recipe='portable'"), model=lambda: nn.Sequential(nn.Linear(1, 1))),
    Case("a non-float weight dtype (int8)", _inject(), ConfigError, ("layers.1.q_proj", "torch.int8", "floating"),
         model=_with_int8_weight),
    Case("not an nn.Module (a state dict)", lambda m, tmp: randlora.inject(m.state_dict(), TARGETS), RandLoraError,
         ("torch.nn.Module", "OrderedDict")),
    Case("an unknown forward path", lambda m, tmp: m.layers[0].q_proj.set_path("fast"), ConfigError,
         ("'fast'", "'activation'"), prep=lambda m, tmp: injected(m)),
    Case("the sparse path on dense bases", lambda m, tmp: m.layers[0].q_proj.set_path("sparse"), ConfigError,
         ("'sparse'", "bases='very_sparse'"), prep=lambda m, tmp: injected(m)),
    # -- state -----------------------------------------------------------------------------------
    Case("injecting twice with the same name", _inject_again, StateError, ("already has", "eject"),
         prep=_inject_first),
    Case("a second named adapter with another seed", _inject(r=4, seed=1, name="task_b"), ConfigError,
         ("seed=1", "'default'", "same values"), prep=lambda m, tmp: injected(m)),
    Case("a second named adapter on layers the first did not adapt", _inject(targets=["q_proj", "head"], r=4,
         name="task_b"), TargetError, ("'task_b'", "head", "narrow targets"), prep=lambda m, tmp: injected(m)),
    Case("an adapter name that is not an identifier", _inject(name="task.b"), ConfigError,
         ("'task.b'", "identifier")),
    Case("use() of an adapter the model lacks", lambda m, tmp: randlora.use(m, "nope"), StateError,
         ("'nope'", "['default']", "name='nope'"), prep=lambda m, tmp: injected(m)),
    Case("delete() of an adapter the model lacks", lambda m, tmp: randlora.delete(m, "nope"), StateError,
         ("'nope'", "to delete", "['default']", "Pass one"), prep=lambda m, tmp: injected(m)),
    Case("delete() on a merged model", lambda m, tmp: randlora.delete(m, "default"), StateError,
         ("merged", "randlora.unmerge(model) first"), prep=_merged),
    Case("merging twice", lambda m, tmp: randlora.merge(m), StateError, ("already merged", "unmerge"), prep=_merged),
    Case("unmerging an unmerged model", lambda m, tmp: randlora.unmerge(m), StateError, ("not merged", "merge("),
         prep=lambda m, tmp: injected(m)),
    Case("ejecting a model without adapters", lambda m, tmp: randlora.eject(m), StateError,
         ("no RandLora adapter", "randlora.inject")),
    Case("merging a model without adapters", lambda m, tmp: randlora.merge(m), StateError,
         ("no RandLora adapter", "randlora.inject")),
    Case("merge(safe=True) with a NaN λ", lambda m, tmp: randlora.merge(m, safe=True), StateError,
         ("layers.1.v_proj", "non-finite", "nothing was merged"), prep=_poison(float("nan"))),
    Case("merge(safe=True) with an inf γ", lambda m, tmp: randlora.merge(m, safe=True), StateError,
         ("layers.1.v_proj", "non-finite", "nothing was merged"), prep=_poison(float("inf"), "randlora_gamma")),
    Case("merge(safe=True) overflowing float16 weights", lambda m, tmp: randlora.merge(m, safe=True), StateError,
         ("layers.0.q_proj", "overflows", "nothing was merged"), prep=_overflow_fp16,
         model=lambda: toy(dtype=torch.float16)),
    Case("merging quantised (bitsandbytes) layers without dequantize", lambda m, tmp: randlora.merge(m), StateError,
         ("layers.1.q_proj", "dequantize=True", "python -m randlora merge"),
         prep=lambda m, tmp: randlora.inject(m, TARGETS, r=4), model=_with_duck_quantized),
    Case("merge(dequantize=True, unload=False)", lambda m, tmp: randlora.merge(m, unload=False, dequantize=True),
         ConfigError, ("dequantize=True", "unload=True"), prep=lambda m, tmp: injected(m)),
    Case("a merge dtype that is not floating point",
         lambda m, tmp: randlora.merge(m, dequantize=True, dtype=torch.int8), ConfigError, ("torch.int8", "floating-point"), prep=lambda m, tmp: injected(m)),
    # -- state dicts -----------------------------------------------------------------------------
    Case("load_state_dict into a model with other shapes", lambda m, tmp: randlora.load_state_dict(m, donor_sd(r=2)),
         CheckpointError, ("shape", "nothing was loaded", "same targets and r"), prep=lambda m, tmp: injected(m)),
    Case("load_state_dict with missing keys",
         lambda m, tmp: randlora.load_state_dict(m, _drop(r"layers\.1\.q_proj\.randlora_gamma", donor_sd())),
         CheckpointError, ("missing keys", "layers.1.q_proj.randlora_gamma"), prep=lambda m, tmp: injected(m)),
    Case("load_state_dict with extra keys",
         lambda m, tmp: randlora.load_state_dict(m, {**donor_sd(), "layers.9.q_proj.randlora_lambda": torch.zeros(4, 2)}),
         CheckpointError, ("unexpected keys", "layers.9.q_proj.randlora_lambda"), prep=lambda m, tmp: injected(m)),
    Case("a state dict from another seed, without bases", lambda m, tmp: randlora.load_state_dict(m, donor_sd(seed=1)),
         FingerprintMismatch, ("seed: checkpoint 1, model 0", "save_projection=True"), prep=lambda m, tmp: injected(m)),
    Case("a state dict from another recipe, without bases",
         lambda m, tmp: randlora.load_state_dict(m, donor_sd(recipe="peft")), FingerprintMismatch,
         ("recipe: checkpoint 'peft', model 'portable'",), prep=lambda m, tmp: injected(m)),
    Case("a state dict with neither fingerprint nor bases",
         lambda m, tmp: randlora.load_state_dict(m, _drop("fingerprint", donor_sd())), FingerprintMismatch,
         ("neither a fingerprint nor bases", "save it again"), prep=lambda m, tmp: injected(m)),
    Case("a state dict whose bases do not match its fingerprint", _corrupt_bases, CheckpointError,
         ("corrupt", "nothing was loaded"), prep=lambda m, tmp: injected(m)),
    Case("a state dict with integer λ",
         lambda m, tmp: randlora.load_state_dict(m, {k: (v.long() if "lambda" in k else v) for k, v in donor_sd().items()}),
         CheckpointError, ("torch.int64", "floating point"), prep=lambda m, tmp: injected(m)),
    Case("a state dict with non-tensor values",
         lambda m, tmp: randlora.load_state_dict(m, {k: v.tolist() for k, v in donor_sd().items()}), CheckpointError,
         ("not (str name -> torch.Tensor)", "randlora.state_dict"), prep=lambda m, tmp: injected(m)),
    Case("a state dict that is not a dict", lambda m, tmp: randlora.load_state_dict(m, [1, 2]), CheckpointError,
         ("list", "randlora.state_dict"), prep=lambda m, tmp: injected(m)),
    Case("load_state_dict into a merged model", lambda m, tmp: randlora.load_state_dict(m, donor_sd()), StateError,
         ("merged", "nothing was loaded", "randlora.unmerge"), prep=_merged),
    Case("a state dict with a malformed fingerprint",
         lambda m, tmp: randlora.load_state_dict(m, {**donor_sd(), "randlora_fingerprint": torch.tensor(5)}),
         CheckpointError, ("randlora_fingerprint", "1-D int64", "corrupt"), prep=lambda m, tmp: injected(m)),
    Case("load_state_dict into a model without adapter", lambda m, tmp: randlora.load_state_dict(m, donor_sd()),
         StateError, ("no RandLora adapter", "randlora.inject")),
    # -- files -----------------------------------------------------------------------------------
    Case("a file with a flipped byte in λ", lambda m, tmp: randlora.load(m, _flipped(tmp, "randlora_lambda")),
         CheckpointError, ("corrupt", "checksum")),
    Case("a file with a flipped byte in λ, into an injected model",
         lambda m, tmp: randlora.load(m, _flipped(tmp, "randlora_lambda")), CheckpointError, ("corrupt", "checksum"),
         prep=lambda m, tmp: injected(m)),
    Case("a truncated file", lambda m, tmp: randlora.load(m, _truncated(tmp)), CheckpointError,
         ("not a readable .safetensors file", "truncated")),
    Case("a file one byte short", lambda m, tmp: randlora.load(m, _cut(tmp, 1)), CheckpointError,
         ("not a readable .safetensors file", "truncated")),
    Case("an empty file", lambda m, tmp: randlora.load(m, _cut(tmp, None)), CheckpointError,
         ("not a readable .safetensors file", "header too small")),
    Case("a truncated file, into an injected model", lambda m, tmp: randlora.load(m, _truncated(tmp)),
         CheckpointError, ("not a readable .safetensors file", "truncated"), prep=lambda m, tmp: injected(m)),
    Case("a file that is not safetensors", lambda m, tmp: randlora.load(m, _not_safetensors(tmp)), CheckpointError,
         ("not a readable .safetensors file", "Only safetensors")),
    Case("a pickle file (never unpickled)", lambda m, tmp: randlora.load(m, _pickle_file(tmp)), CheckpointError,
         ("not a readable .safetensors file", "pickle")),
    Case("a safetensors file that is not a randlora adapter", lambda m, tmp: randlora.load(m, _foreign_safetensors(tmp)),
         CheckpointError, ("not a randlora adapter", "model.safetensors")),
    Case("a file with unreadable settings", lambda m, tmp: randlora.load(m, _bad_settings(tmp)), CheckpointError,
         ("unreadable adapter settings", "save the adapter again")),
    Case("a file that does not exist", lambda m, tmp: randlora.load(m, tmp / "nope.safetensors"), CheckpointError,
         ("nope.safetensors", "does not exist")),
    Case("a file for a model with other shapes", lambda m, tmp: randlora.load(m, saved(tmp, injected(toy(d=6)))),
         CheckpointError, ("shape", "nothing was loaded")),
    Case("a file for a model with other layer names", lambda m, tmp: randlora.load(m, _other_names(tmp)),
         CheckpointError, ("not this model's", "encoder", "the model it was trained on")),
    Case("a file whose paths need one prefix replaced by another",
         lambda m, tmp: randlora.load(m, _other_container(tmp)), CheckpointError,
         ("not this model's", "prefix=('body.', 'layers.')", "maps all 4")),
    Case("a peft folder without adapter_config.json", lambda m, tmp: randlora.load_peft(m, _empty_dir(tmp)),
         CheckpointError, ("adapter_config.json", "peft adapter folder")),
    Case("saving to a directory", lambda m, tmp: randlora.save(m, tmp), CheckpointError,
         ("is a directory", "adapter.safetensors"), prep=lambda m, tmp: injected(m)),
]


MAX_MESSAGE = 1500  # an error is read by a person: cause first, a few examples and a count, not a dump


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(case: Case, tmp_path: Path) -> None:
    model = case.model()
    case.prep(model, tmp_path)
    before = snapshot(model)
    with pytest.raises(case.error) as info:
        case.call(model, tmp_path)
    msg = str(info.value)
    for piece in case.says:
        assert piece in msg, f"message lacks {piece!r}: {msg}"
    assert len(msg) <= MAX_MESSAGE, f"{len(msg)} characters: {msg[:300]}..."
    assert isinstance(info.value, ValueError)
    assert_unchanged(before, snapshot(model))
    assert not (tmp_path / "PWNED").exists()


def test_table_size_and_docs_mirror() -> None:
    assert len(CASES) >= 25
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text(encoding="utf-8")
    assert "\n## Bad inputs\n" in doc, "docs/errors.md lost its '## Bad inputs' section"
    section = doc.split("\n## Bad inputs\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| bad input")]
    for case in CASES:
        assert any(f"| {case.what} | `{case.error.__name__}` |" in row for row in rows), case.what
    assert len([r for r in rows if not r.startswith("|---")]) == len(CASES)
    assert f"The {len(CASES)} bad inputs" in section


# ------------------------------------------------------------------------------------------------
# beyond the table
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["swap module", "weight byte", "requires_grad", "bank buffer", "merged flag",
                                    "train mode", "new attribute"])
def test_snapshot_sees_every_kind_of_change(change: str) -> None:
    """The helper the table relies on does notice each kind of change a half-applied call could leave."""
    model = injected(toy())
    before = snapshot(model)
    layer = model.layers[0].q_proj
    with torch.no_grad():
        if change == "swap module":
            model.layers[1].norm = nn.LayerNorm(8)
        elif change == "weight byte":
            w = model.layers[0].mlp[0].weight
            w.view(-1)[3] = torch.nextafter(w.view(-1)[3], torch.tensor(float("inf")))
        elif change == "requires_grad":
            model.head.weight.requires_grad_(True)
        elif change == "bank buffer":
            layer.bank.A.view(-1)[0] += 1
        elif change == "merged flag":
            layer.merged_name = "default"
        elif change == "train mode":
            model.eval()
        else:
            model.extra = 1
    with pytest.raises(AssertionError, match="changed the model"):
        assert_unchanged(before, snapshot(model))


def test_the_pickle_would_have_fired(tmp_path: Path) -> None:
    """The bomb works: unpickling it DOES create the marker, so its absence above proves no unpickling."""
    path = tmp_path / "bomb.pkl"
    path.write_bytes(pickle.dumps(_Bomb(tmp_path / "fired")))
    pickle.loads(path.read_bytes())
    assert (tmp_path / "fired").exists()
    torch_file = _pickle_file(tmp_path)
    with pytest.raises(CheckpointError):
        read_file(torch_file)
    assert not (tmp_path / "PWNED").exists()


API = {
    "inject": lambda x: randlora.inject(x, TARGETS),
    "merge": randlora.merge,
    "unmerge": randlora.unmerge,
    "eject": randlora.eject,
    "summary": randlora.summary,
    "trainable_parameters": randlora.trainable_parameters,
    "state_dict": randlora.state_dict,
    "load_state_dict": lambda x: randlora.load_state_dict(x, {}),
    "save": lambda x: randlora.save(x, "never-written.safetensors"),
    "disabled": lambda x: randlora.disabled(x).__enter__(),
}


@pytest.mark.parametrize("fn", list(API), ids=list(API))
@pytest.mark.parametrize("thing", [None, "model", {"weight": torch.zeros(2, 2)}], ids=["None", "str", "dict"])
def test_api_refuses_non_modules(fn: str, thing: Any) -> None:
    with pytest.raises(RandLoraError, match="torch.nn.Module"):
        API[fn](thing)
    assert not os.path.exists("never-written.safetensors")


def test_inject_builds_everything_before_swapping(monkeypatch) -> None:
    """A failure while building the SECOND wrapper (after validation) swaps nothing."""
    model = toy()
    before = snapshot(model)
    real = randlora.RandLoraLinear.__init__
    calls = []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        real(self, *a, **k)

    monkeypatch.setattr(randlora.RandLoraLinear, "__init__", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        randlora.inject(model, TARGETS, r=4)
    assert len(calls) == 2
    assert_unchanged(before, snapshot(model))


def test_failed_load_keeps_the_trained_adapter(tmp_path: Path) -> None:
    """Loading a bad file into a model with a trained adapter keeps that adapter (λ, γ, bank, flags)."""
    model = injected(toy())
    ref = {k: v.clone() for k, v in randlora.state_dict(model).items()}
    before = snapshot(model)
    for bad in (_truncated(tmp_path), saved(tmp_path, injected(toy(), seed=5), name="other.safetensors")):
        with pytest.raises(CheckpointError):
            randlora.load(model, bad)
    assert_unchanged(before, snapshot(model))
    now = randlora.state_dict(model)
    assert ref.keys() == now.keys() and all(torch.equal(ref[k], now[k]) for k in ref)


# -- atomic saves -------------------------------------------------------------------------------
def _patch_writer(monkeypatch, fn) -> None:
    import safetensors.torch

    import randlora.checkpoint as ck

    monkeypatch.setattr(safetensors.torch, "save_file", fn)
    monkeypatch.setattr(ck, "save_file", fn, raising=False)


@pytest.mark.parametrize("where", ["writer", "fsync", "rename"])
def test_failed_save_keeps_the_previous_file(where: str, tmp_path: Path, monkeypatch) -> None:
    path = saved(tmp_path)  # version 1 on disk
    good = path.read_bytes()
    model = injected(toy(), seed=3)  # would write different bytes

    if where == "writer":
        def boom(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"half a file")  # partial write, then the disk fills up
            raise OSError("No space left on device (simulated)")
        _patch_writer(monkeypatch, boom)
    elif where == "fsync":
        def boom(fd):
            raise OSError("I/O error (simulated)")
        monkeypatch.setattr(os, "fsync", boom)
    else:
        def boom(src, dst):
            raise OSError("rename failed (simulated)")
        monkeypatch.setattr(os, "replace", boom)

    with pytest.raises(OSError, match="simulated"):
        randlora.save(model, path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
    tensors, cfg = read_file(path)  # still a readable adapter
    assert cfg.seed == 0


def test_save_writes_through_a_temporary_file(tmp_path: Path, monkeypatch) -> None:
    """The writer never writes the destination itself (so an interrupted write cannot damage it)."""
    import safetensors.torch

    real = safetensors.torch.save_file
    seen = []

    def spy(tensors, filename, metadata=None):
        seen.append(Path(filename))
        return real(tensors, filename, metadata=metadata)

    _patch_writer(monkeypatch, spy)
    path = saved(tmp_path)
    assert seen and all(p != path and p.parent == path.parent for p in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_corrupted_bytes_are_refused(tmp_path: Path) -> None:
    """Flipping bytes inside the stored bases is caught (their checksum), nothing is loaded."""
    path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    meta = json.loads(bytes(data[8:header]))
    start, end = meta["randlora_B"]["data_offsets"]
    for i in range(header + start, header + min(end, start + 64)):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    model = injected(toy())
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="corrupt"):
        randlora.load(model, path)
    assert_unchanged(before, snapshot(model))


# ------------------------------------------------------------------------------------------------
# loading errors on a model of realistic size: short, cause first
# ------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.query, self.key, self.value, self.dense = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


class _Encoder(nn.Module):
    """BERT-like names: 12 blocks of 6 linear layers (72 adapted layers, 144 adapter tensors)."""

    def __init__(self, d: int = 8, blocks: int = 12) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Block(d) for _ in range(blocks))


class _Wrapper(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.encoder, self.head = _Encoder(d), nn.Linear(d, 2)


def _saved_encoder(tmp: Path, d: int = 8, r: int = 2, wrapper: bool = False) -> Path:
    model = _Wrapper(d) if wrapper else _Encoder(d)
    randlora.inject(model, ["query", "key", "value", "dense", "up", "down"], r=r)
    return randlora.save(model, tmp / f"a{d}{r}{wrapper}.safetensors", save_projection=False)


LOAD_ERRORS = {
    "other widths": (lambda tmp: _Encoder(4), lambda tmp: _saved_encoder(tmp, d=8),
                     "the model's layers are narrower than the adapter's: layer.0.dense is (4, 4) here"),
    "two submodules fit": (lambda tmp: nn.ModuleDict({"a": _Encoder(), "b": _Encoder()}),
                           lambda tmp: _saved_encoder(tmp), "the adapter's layer paths fit the model in 2 ways"),
    "no layer matches": (lambda tmp: nn.Sequential(*(nn.Linear(8, 8) for _ in range(40))),
                         lambda tmp: _saved_encoder(tmp), "the adapter's layers are not this model's"),
    "half the layers match": (lambda tmp: _Encoder(blocks=6), lambda tmp: _saved_encoder(tmp),
                              "the adapter has layers 0-11 of 'layer', the model 0-5 (36 of its 72 layers"),
}


@pytest.mark.parametrize("kind", list(LOAD_ERRORS))
def test_load_errors_on_a_large_model_are_short_and_name_the_cause(kind: str, tmp_path: Path) -> None:
    make, file, cause = LOAD_ERRORS[kind]
    model = make(tmp_path)
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        randlora.load(model, file(tmp_path))
    msg = str(info.value)
    assert msg.startswith(cause), msg
    assert len(msg) <= MAX_MESSAGE, f"{len(msg)} characters: {msg[:300]}..."
    assert msg.count("layer.") <= 8, msg  # a few examples, not a list of every layer
    assert_unchanged(before, snapshot(model))


def test_state_dict_errors_on_a_large_model_are_short(tmp_path: Path) -> None:
    model = _Encoder()
    randlora.inject(model, ["query", "key", "value", "dense", "up", "down"], r=4)
    sd = dict(randlora.state_dict(_injected_encoder(r=2), save_projection=False))
    sd.update({f"extra.{i}.randlora_lambda": torch.zeros(1) for i in range(50)})
    for k in list(sd)[:30]:
        sd.pop(k)
    with pytest.raises(CheckpointError) as info:
        randlora.load_state_dict(model, sd)
    msg = str(info.value)
    assert msg.startswith("the adapter was made with r=2, this model's adapter has r=4"), msg
    assert "missing keys" in msg and "50 unexpected keys" in msg
    assert len(msg) <= MAX_MESSAGE, f"{len(msg)} characters: {msg[:300]}..."


def _injected_encoder(r: int) -> nn.Module:
    model = _Encoder()
    randlora.inject(model, ["query", "key", "value", "dense", "up", "down"], r=r)
    return model


# ------------------------------------------------------------------------------------------------
# an adapter for another model: what differs (widths, depth) first; a prefix only where one maps every path
# ------------------------------------------------------------------------------------------------
BERT_TARGETS = ["query", "key", "value", "dense"]


def _bert(width: int, depth: int) -> nn.Module:
    transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=width, num_hidden_layers=depth, num_attention_heads=2,
                                  intermediate_size=2 * width, max_position_embeddings=8)
    return transformers.BertModel(cfg)


def _bert_adapter(tmp: Path, width: int, depth: int) -> Path:
    model = _bert(width, depth)
    randlora.inject(model, BERT_TARGETS, r=4)
    return randlora.save(model, tmp / f"bert{width}x{depth}.safetensors", save_projection=False)


_DEPTH = "the adapter has layers 0-3 of 'encoder.layer', the model 0-1"
WRONG_MODEL = {  # the adapter's (width, depth), the model's, inject first?, how the message starts, what else it says
    "narrower and shallower": ((48, 4), (32, 2), False, "the model's layers are narrower than the adapter's: ",
                               ("is (32, 32) here, min(out, in) = 48", _DEPTH)),
    "wider and shallower": ((32, 4), (48, 2), False, "the model's layers are wider than the adapter's: ",
                            ("is (48, 48) here, min(out, in) = 32", _DEPTH)),
    "narrower and deeper": ((48, 2), (32, 4), False, "the model's layers are narrower than the adapter's: ",
                            ("is (32, 32) here, min(out, in) = 48",)),
    "wider and deeper": ((32, 2), (48, 4), False, "the model's layers are wider than the adapter's: ",
                         ("is (48, 48) here, min(out, in) = 32",)),
    "shallower, same width": ((48, 4), (48, 2), False, _DEPTH, ("12 of its 25 layers",)),
    "shallower, into an injected model": ((48, 4), (48, 2), True, _DEPTH, ("unexpected keys",)),
    "narrower and shallower, into an injected model": ((48, 4), (32, 2), True,
                                                       "the model's layers are narrower than the adapter's: ",
                                                       (_DEPTH,)),
}


@pytest.mark.parametrize("case", list(WRONG_MODEL))
def test_an_adapter_for_another_model_says_what_differs_first(case: str, tmp_path: Path) -> None:
    theirs, ours, inject, start, says = WRONG_MODEL[case]
    path = _bert_adapter(tmp_path, *theirs)
    model = _bert(*ours)
    if inject:
        randlora.inject(model, BERT_TARGETS, r=4)
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        randlora.load(model, path)
    msg = str(info.value)
    assert msg.startswith(start), msg
    for piece in says:
        assert piece in msg, f"message lacks {piece!r}: {msg}"
    assert "prefix" not in msg, msg  # no prefix maps these paths: suggesting one would mislead
    assert len(msg) <= MAX_MESSAGE, f"{len(msg)} characters: {msg[:300]}..."
    assert_unchanged(before, snapshot(model))


class _Backbone(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.add_module(name, _bert(32, 2))


def test_a_prefix_is_suggested_where_it_maps_every_path(tmp_path: Path) -> None:
    """An adapter of ``backbone.encoder.layer.*`` onto a model whose BERT sits at ``bert.``: neither adding nor
    stripping maps the paths, replacing ``backbone.`` by ``bert.`` does; the error says so, and following it
    loads the adapter."""
    donor = _Backbone("backbone")
    randlora.inject(donor, BERT_TARGETS, r=4)
    randomize(donor, 1)
    path = randlora.save(donor, tmp_path / "a.safetensors", save_projection=False)
    model = _Backbone("bert")
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        randlora.load(model, path)
    msg = str(info.value)
    assert msg.startswith("the adapter's layers are not this model's"), msg
    assert "prefix=('backbone.', 'bert.'), which maps all 13" in msg and len(msg) <= MAX_MESSAGE, msg
    assert_unchanged(before, snapshot(model))
    randlora.load(model, path, prefix=("backbone.", "bert."))
    want = randlora.state_dict(donor, save_projection=False)
    got = randlora.state_dict(model, save_projection=False)
    assert {k.replace("backbone.", "bert.", 1) for k in want} == set(got)
    assert all(torch.equal(v, got[k.replace("backbone.", "bert.", 1)]) for k, v in want.items())
