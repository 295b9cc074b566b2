"""Adapters follow the layers, not the module ``inject`` was called on (issue 19).

A matrix over the layouts users have

    bare model | wrapper with a head | transformers model with a task head | torch.compile'd | DDP-wrapped

times where ``inject`` was called (the model's root, or a submodule: the encoder inside the wrapper,
``model.bert`` in the task model), times what is done with the adapter:

- ``save`` -> ``load`` into a fresh plain copy of the model (in its layout), into the bare base module
  (across layouts), and into a fresh copy adapted the same way (``load`` -> ``load_state_dict``);
- ``randlora.hf.RandLoraTrainer`` checkpoints -> resume (equal to an uninterrupted run to 1e-6; checkpoints
  hold ``randlora_adapter.safetensors`` and no model weights; ``randlora.load(model, ".../checkpoint-N")``);
- ``python -m randlora merge`` into the weight file the user has (the model's own as held, the plain
  model's, the bare base module's), and ``export-lora`` against the same file;
- ``save_peft`` -> ``peft.PeftModel.from_pretrained`` on the module the adapter was trained on (and back
  with ``load_peft`` across layouts); ``save_lora`` -> peft's LoRA on that module.

Cells that would repeat another are skipped with the reason (the bare model is its own base module; a model
that is neither compiled nor DDP-wrapped has no state_dict of its own beyond the plain model's).

Outputs must equal the adapted model's to 1e-5 (fp32), with random non-zero ``λ``, ``γ`` and trained biases;
every comparison also checks that the adapter changes the outputs by far more than that.

Compiled models use the ``aot_eager`` backend: dynamo's tracing (where ``_orig_mod.`` comes from) without
inductor's code generation, which would cost ~10 s per graph on this machine and says nothing about layouts
(tests/test_machinery.py covers inductor). DDP runs as a single-process gloo group (world size 1) set up
in-process from a FileStore and destroyed after each test.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

import randlora
from randlora.__main__ import main as cli
from randlora.errors import CheckpointError
from randlora.layer import RandLoraLinear

transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")
peft = pytest.importorskip("peft", reason="peft is an optional test dependency")

from randlora.hf import ADAPTER_FILE, EXTRA_FILE, trainer_class  # noqa: E402
from stop_at import StopAt  # noqa: E402

TOL = 1e-5  # outputs (fp32)
RESUME_TOL = 1e-6  # adapter values after resuming
CHANGED = 100 * TOL  # the adapter must move the outputs by more than this
D, H, CLASSES, VOCAB, SEQ = 16, 24, 3, 50, 8
NET_TARGETS = ["q_proj", "up_proj", "down_proj"]  # O = I, O > I, O < I
BERT_TARGETS = ["query", "value", "intermediate.dense"]
SETTINGS = dict(r=4, alpha=8, seed=3, bias="randlora_only")  # trained biases travel with the paths too
BACKEND = "aot_eager"
LAYOUTS = ["bare", "wrapper", "bert", "compiled", "ddp"]
WHERE = ["root", "sub"]
MAX_STEPS, STOP = 6, 4


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.up_proj, self.down_proj = nn.Linear(D, D), nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        return x + self.down_proj(torch.tanh(self.up_proj(x + self.q_proj(x))))


class Encoder(nn.Module):
    """The bare base model: a stack of blocks. With ``labels`` it is its own regression model (so that the
    Trainer can train it bare)."""

    def __init__(self, n_layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(n_layers)])
        self.norm = nn.LayerNorm(D)

    def forward(self, x, labels=None, **kwargs):
        for blk in self.layers:
            x = blk(x)
        x = self.norm(x)
        return x if labels is None else {"loss": nn.functional.mse_loss(x, labels), "hidden": x}


class Wrapped(nn.Module):
    """The encoder inside a wrapper with a classification head: layer paths ``encoder.layers.0.q_proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x, labels=None, **kwargs):
        logits = self.head(self.encoder(x))
        return logits if labels is None else {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Twin(nn.Module):
    """Two identical encoders (same weights as ``Layout("bare").plain()``): an ``Encoder``'s adapter fits both."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Encoder(), Encoder()
        plain = Layout("bare").plain().state_dict()
        self.a.load_state_dict(plain)
        self.b.load_state_dict(plain)
        self.eval()

    def forward(self, x):
        return self.a(x) + self.b(x)


def bert_config():
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=H, max_position_embeddings=2 * SEQ, num_labels=CLASSES,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class Layout:
    """How one layout is built, wrapped, injected and read out.

    ``inner`` is the user's plain ``nn.Module`` (``Encoder``, ``Wrapped`` or ``BertForSequenceClassification``);
    ``full`` is what the user holds and passes to randlora (``inner``, ``torch.compile(inner)`` or
    ``DDP(inner)``); ``base`` is the bare base module inside ``inner``; ``sub`` is the submodule injected on
    for ``where="sub"``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.bert = name == "bert"
        self.targets = BERT_TARGETS if self.bert else NET_TARGETS

    # building
    def plain(self) -> nn.Module:
        torch.manual_seed(0)
        if self.bert:
            m = transformers.BertForSequenceClassification(bert_config())
        else:
            m = Encoder() if self.name == "bare" else Wrapped()
        return m.eval()

    def plain_base(self) -> nn.Module:
        """A fresh plain bare base module, with the base model's weights."""
        return self.base(self.plain())

    def base(self, inner: nn.Module) -> nn.Module:
        return inner.bert if self.bert else inner if self.name == "bare" else inner.encoder

    def sub(self, inner: nn.Module) -> nn.Module:
        # the bare model's submodule is its ModuleList of blocks (paths "0.q_proj", ...)
        return inner.bert if self.bert else inner.layers if self.name == "bare" else inner.encoder

    def host(self, inner: nn.Module, where: str) -> nn.Module:
        return inner if where == "root" else self.sub(inner)

    def wrap(self, inner: nn.Module) -> nn.Module:
        """What the user holds. DDP wraps a model that is already adapted (it registers the parameters that
        need gradients when it is built); torch.compile may wrap either."""
        if self.name == "compiled":
            return torch.compile(inner, backend=BACKEND)
        if self.name == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            return DDP(inner)
        return inner

    def adapted(self, where: str, fill: bool = True, freeze: bool = False) -> tuple[nn.Module, nn.Module]:
        """``(inner, full)``: a plain model adapted at ``where`` the way a user of this layout does it, with
        random adapter values (``fill``). A compiled model is compiled first and injected through the
        compiled module (``inject(torch.compile(m))`` injects into ``m``). ``freeze``: also freeze what lies
        outside the module inject was called on (before DDP wraps the model)."""
        inner = self.plain()
        if self.name == "compiled":
            full = self.wrap(inner)
            randlora.inject(full if where == "root" else full.encoder, self.targets, **SETTINGS)
        else:
            randlora.inject(self.host(inner, where), self.targets, **SETTINGS)
            full = None
        if freeze:
            freeze_outside(inner, self.host(inner, where))
        if fill:
            fill_adapter(inner)
        return inner, (full if full is not None else self.wrap(inner))

    # inputs and outputs
    def inputs(self, n: int = 4):
        g = torch.Generator().manual_seed(11)
        if self.bert:
            return torch.randint(0, VOCAB, (n, SEQ), generator=g)
        return torch.randn(n, D, generator=g)

    def out(self, model: nn.Module, x) -> torch.Tensor:
        """The whole model's output (logits, or the bare model's hidden states)."""
        with torch.no_grad():
            return model(input_ids=x).logits if self.bert else model(x)

    def base_out(self, base: nn.Module, x) -> torch.Tensor:
        with torch.no_grad():
            return base(input_ids=x).last_hidden_state if self.bert else base(x)

    def data(self, n: int = 24):
        g = torch.Generator().manual_seed(0)
        if self.bert:
            ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
            return [{"input_ids": i, "labels": int(i[0]) % CLASSES} for i in ids]
        x = torch.randn(n, D, generator=g)
        if self.name == "bare":
            return [{"x": v, "labels": torch.tanh(v.flip(0))} for v in x]
        return [{"x": v, "labels": int(v[0] > 0) + int(v[1] > 0)} for v in x]


def fill_adapter(model: nn.Module, seed: int = 5) -> None:
    """Random ``λ ~ N(0, 1)``, ``γ ~ N(0, 1/m²)`` and trained biases, wherever the adapter sits in ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, RandLoraLinear):
                lam, gam = mod.adapter().randlora_lambda, mod.adapter().randlora_gamma
                lam.copy_(torch.randn(lam.shape, generator=g))
                gam.copy_(torch.randn(gam.shape, generator=g) / mod.m)
                if mod.bias is not None and mod.bias.requires_grad:
                    mod.bias.add_(0.3 * torch.randn(mod.bias.shape, generator=g))


def freeze_outside(module: nn.Module, host: nn.Module) -> list[str]:
    """Freeze ``module``'s parameters outside ``host`` (inject freezes only inside the module it is called on);
    returns their names."""
    inside = {id(p) for p in host.parameters()}
    names = []
    for n, p in module.named_parameters():
        if id(p) not in inside and p.requires_grad:
            p.requires_grad_(False)
            names.append(n)
    return names


def layer_paths(host: nn.Module) -> set[str]:
    """The adapted layers' paths relative to ``host`` (the module inject was called on)."""
    return {n for n, m in host.named_modules() if isinstance(m, RandLoraLinear)}


def file_layers(path) -> set[str]:
    tensors, _ = randlora.checkpoint.read_file(path)
    return {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".randlora_lambda")}


def assert_close(got, want, plain, what=""):
    err = (got - want).abs().max().item()
    assert err <= TOL, f"{what}: max error {err:.3g}"
    assert (plain - want).abs().max().item() > CHANGED, f"{what}: the adapter does not change the outputs"


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def ddp_group(tmp_path):
    """A single-process gloo group (world size 1) from a FileStore; destroyed afterwards."""
    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(params=LAYOUTS)
def L(request) -> Layout:
    if request.param == "ddp":
        request.getfixturevalue("ddp_group")
    return Layout(request.param)


@pytest.fixture(scope="module")
def _adapted_cache():
    return {}


@pytest.fixture
def adapted(L, _adapted_cache):
    """``where -> (inner, full, wanted outputs)`` with a compiled full model run once (and compared with
    eager). Models are shared between tests (compiling is slow); tests must not change them. DDP wrappers
    are built per test (the process group is)."""

    def build(where):
        inner, full = L.adapted(where)
        x = L.inputs()
        want = L.out(inner, x)  # eager, unwrapped
        if L.name in ("compiled", "ddp"):
            assert (L.out(full, x) - want).abs().max().item() <= TOL
        return inner, full, want

    def get(where):
        if L.name == "ddp":
            return build(where)
        key = (L.name, where)
        if key not in _adapted_cache:
            _adapted_cache[key] = build(where)
        return _adapted_cache[key]

    return get


# ------------------------------------------------------------------------------------------------
# save -> load
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("into", ["copy", "base", "adapted"])
@pytest.mark.parametrize("where", WHERE)
def test_save_then_load(L, adapted, where, into, tmp_path):
    inner, full, want = adapted(where)
    x = L.inputs()
    path = randlora.save(full, tmp_path / "adapter.safetensors")
    # the file names layers relative to the module inject was called on: no wrapper prefix of any kind
    assert file_layers(path) == layer_paths(L.host(inner, where))
    if into == "copy":
        # a fresh plain copy in the user's layout: compiled models take the adapter through the compiled
        # module; a DDP model is wrapped after loading (DDP registers the trainable parameters when built)
        fresh = L.plain()
        if L.name == "compiled":
            target = L.wrap(fresh)
            assert randlora.load(target, path) is target
        else:
            assert randlora.load(fresh, path) is fresh
            target = L.wrap(fresh)
        assert layer_paths(L.host(fresh, where)) == file_layers(path)  # injected where it was trained
        assert_close(L.out(target, x), want, L.out(L.plain(), x), f"{L.name}/{where} -> copy")
    elif into == "base":
        if L.name == "bare":
            pytest.skip("the bare model is its own base module: the 'copy' cell")
        base = L.plain_base()
        randlora.load(base, path)
        want_base = L.base_out(L.base(inner), x)
        assert_close(L.base_out(base, x), want_base, L.base_out(L.plain_base(), x), f"{L.name}/{where} -> base")
    else:
        # a fresh copy adapted the same way (λ = 0), in its layout: load goes through load_state_dict
        fresh, target = L.adapted(where, fill=False)
        randlora.load(target, path)
        assert_close(L.out(target, x), want, L.out(L.plain(), x), f"{L.name}/{where} -> adapted copy")


def test_load_state_dict_across_layouts():
    """``load_state_dict`` of the wrapper's adapter into an encoder adapted on its own, and back."""
    L = Layout("wrapper")
    inner, _ = L.adapted("root")
    x = L.inputs()
    want = L.out(inner, x)
    enc = L.plain_base()
    randlora.inject(enc, NET_TARGETS, **SETTINGS)
    randlora.load_state_dict(enc, randlora.state_dict(inner))
    assert_close(L.base_out(enc, x), L.base_out(inner.encoder, x), L.base_out(L.plain_base(), x), "wrapper -> encoder")
    back, _ = L.adapted("root", fill=False)
    randlora.load_state_dict(back, randlora.state_dict(enc))
    assert_close(L.out(back, x), want, L.out(L.plain(), x), "encoder -> wrapper")


# ------------------------------------------------------------------------------------------------
# Trainer checkpoint -> resume
# ------------------------------------------------------------------------------------------------
def train_args(out):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=2e-2,
        save_strategy="steps", save_steps=2, logging_strategy="no", use_cpu=True, report_to=[], seed=0,
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0)


def adapter_values(model):
    return {k: v.detach().clone() for k, v in randlora.state_dict(model, save_projection=False).items()
            if k != "randlora_fingerprint"}


def trained_values(full):
    """Every parameter the Trainer trains: the adapter's and, with inject on a submodule, the rest (head)."""
    return {n: p.detach().clone() for n, p in full.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("where", WHERE)
def test_trainer_checkpoint_then_resume(L, where, tmp_path):
    Trainer = trainer_class()

    def run(out, stop=None, resume=None):
        # with inject on a submodule the rest of the model (the head, the bare model's final norm) still trains:
        # the checkpoints hold it beside the adapter (EXTRA_FILE)
        inner, full = L.adapted(where, fill=False)
        trainer = Trainer(model=full, args=train_args(out), train_dataset=L.data(),
                          callbacks=[StopAt(stop)] if stop else None)
        trainer.train(resume_from_checkpoint=resume)
        return inner, full

    straight, straight_full = run(tmp_path / "a")
    want = adapter_values(straight)
    assert any(v.abs().max() > 0 for k, v in want.items() if k.endswith("randlora_lambda")), "nothing trained"
    want_all = trained_values(straight_full)
    outside = {n for n in want_all if "randlora_" not in n and not n.endswith(".bias")}
    assert bool(outside) == (where == "sub"), outside

    run(tmp_path / "b", stop=STOP)
    ck = tmp_path / "b" / f"checkpoint-{STOP}"
    files = {p.name for p in ck.iterdir()}
    assert ADAPTER_FILE in files, files
    assert (EXTRA_FILE in files) == (where == "sub"), files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, files
    assert file_layers(ck / ADAPTER_FILE) == layer_paths(L.host(straight, where))

    resumed, resumed_full = run(tmp_path / "b", resume=str(ck))
    got = adapter_values(resumed)
    assert set(got) == set(want)
    for k in want:
        assert (got[k] - want[k]).abs().max().item() <= RESUME_TOL, k
    got_all = trained_values(resumed_full)
    assert set(got_all) == set(want_all)
    for k in want_all:  # the head trained outside the adapter resumes exactly too
        assert (got_all[k] - want_all[k]).abs().max().item() <= RESUME_TOL, k

    # the last checkpoint folder loads as it is, into a plain copy and into the bare base module
    last = tmp_path / "b" / f"checkpoint-{MAX_STEPS}"
    x = L.inputs()
    resumed.eval()
    fresh = apply_extra(randlora.load(L.plain(), last), last)
    assert_close(L.out(fresh, x), L.out(resumed, x), L.out(L.plain(), x), "checkpoint -> copy")
    if L.name != "bare":
        base = randlora.load(L.plain_base(), str(last))
        assert_close(L.base_out(base, x), L.base_out(L.base(resumed), x), L.base_out(L.plain_base(), x),
                     "checkpoint -> base")
    # and the command line takes the checkpoint folder as the adapter
    weights, load = write_weights(L, "inner", tmp_path / "weights")
    out = tmp_path / "merged" / "model.safetensors"
    assert cli(["merge", "--base", str(weights), "--adapter", str(last), "--out", str(out)]) == 0
    assert_close(L.out(apply_extra(load(out), last), x), L.out(resumed, x), L.out(L.plain(), x), "checkpoint -> merge")


def apply_extra(model, checkpoint: Path):
    """The parameters trained beside the adapter (EXTRA_FILE, e.g. the head), found by the matching rule."""
    if (checkpoint / EXTRA_FILE).exists():
        extra, params = load_file(str(checkpoint / EXTRA_FILE)), dict(model.named_parameters())
        pm = randlora.paths.match_paths(extra, params)
        with torch.no_grad():
            for k, v in extra.items():
                params[pm(k)].copy_(v)
    return model


# ------------------------------------------------------------------------------------------------
# command line merge into the user's weight file
# ------------------------------------------------------------------------------------------------
def write_weights(L: Layout, which: str, folder: Path) -> tuple[Path, callable]:
    """The plain weights as the user has them, and how the user loads a file of that layout.

    ``model``: the state_dict of the model as held (``_orig_mod.``/``module.`` keys of a compiled/DDP
    model); ``inner``: the plain model's (``save_pretrained`` for transformers); ``base``: the bare base
    module's (``BertModel.save_pretrained``, the bare encoder's state_dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    if which == "model":
        held = L.wrap(L.plain())
        save_file({k: v.contiguous() for k, v in held.state_dict().items()}, str(folder / "model.safetensors"))

        def load(path):
            m = L.wrap(L.plain())
            m.load_state_dict(load_file(str(path)))
            return m
        return folder / "model.safetensors", load
    module = L.plain() if which == "inner" else L.plain_base()
    if L.bert:
        module.save_pretrained(folder)  # model.safetensors + config.json, as from the Hub

        def load(path):
            merged = Path(path).parent
            shutil.copy(folder / "config.json", merged / "config.json")
            return type(module).from_pretrained(merged).eval()
    else:
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "model.safetensors"))

        def load(path):
            m = L.plain() if which == "inner" else L.plain_base()
            m.load_state_dict(load_file(str(path)))
            return m
    return folder / "model.safetensors", load


@pytest.mark.parametrize("which", ["model", "inner", "base"])
@pytest.mark.parametrize("where", WHERE)
def test_cli_merge_into_the_users_weight_file(L, adapted, where, which, tmp_path, capsys):
    if which == "model" and L.name not in ("compiled", "ddp"):
        pytest.skip("the model's own state_dict is the plain model's: the 'inner' cell")
    if which == "base" and L.name == "bare":
        pytest.skip("the bare model is its own base module: the 'inner' cell")
    inner, full, want = adapted(where)
    x = L.inputs()
    adapter = randlora.save(full, tmp_path / "adapter.safetensors", save_projection=False)
    weights, load = write_weights(L, which, tmp_path / "base")
    out = tmp_path / "merged" / "model.safetensors"
    rc = cli(["merge", "--base", str(weights), "--adapter", str(adapter), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    merged = load(out)
    if which == "base":
        assert_close(L.base_out(merged, x), L.base_out(L.base(inner), x), L.base_out(L.plain_base(), x),
                     f"merge {L.name}/{where} into the base module's file")
    else:
        assert_close(L.out(merged, x), want, L.out(L.plain(), x), f"merge {L.name}/{where} into the {which} file")
    # export-lora reads the same file's shapes by the same rule; its keys keep the adapter's paths
    # (documented in randlora.export.export_file), so peft applies the folder to the module inject was on
    lora = tmp_path / "lora"
    rc = cli(["export-lora", str(adapter), "--base", str(weights), "--out", str(lora), "--rank", "full"])
    assert rc == 0, capsys.readouterr().err
    fresh = L.plain()
    pm = peft.PeftModel.from_pretrained(L.host(fresh, where), str(lora)).eval()
    assert_close(L.out(pm if where == "root" else fresh, x), want, L.out(L.plain(), x),
                 f"export-lora {L.name}/{where} against the {which} file")


# ------------------------------------------------------------------------------------------------
# save_peft -> peft
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", WHERE)
def test_save_peft_then_peft_loads_it(L, adapted, where, tmp_path):
    inner, full, want = adapted(where)
    x = L.inputs()
    folder = tmp_path / "peft"
    randlora.save_peft(full, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert "_orig_mod" not in json.dumps(cfg) and "module." not in json.dumps(cfg)
    # peft's keys are relative to the model given to get_peft_model: here the module inject was called on.
    # peft injects in place, so with where="sub" the whole model's outputs come from the outer model.
    fresh = L.plain()
    pm = peft.PeftModel.from_pretrained(L.host(fresh, where), folder).eval()
    got = L.out(pm if where == "root" else fresh, x)
    assert_close(got, want, L.out(L.plain(), x), f"peft {L.name}/{where}")
    # and back with this library, by the matching rule: into a fresh copy as held, and the bare base module
    again = L.plain()
    randlora.load_peft(L.wrap(again) if L.name == "compiled" else again, folder)
    assert_close(L.out(again, x), want, L.out(L.plain(), x), f"load_peft {L.name}/{where} -> copy")
    if L.name != "bare":
        base = randlora.load_peft(L.plain_base(), folder)
        assert_close(L.base_out(base, x), L.base_out(L.base(inner), x), L.base_out(L.plain_base(), x),
                     f"load_peft {L.name}/{where} -> base")


@pytest.mark.parametrize("where", WHERE)
def test_save_lora_then_peft_loads_it(L, adapted, where, tmp_path):
    """``to_lora``/``save_lora`` on the model as held: layers named relative to the module inject was called
    on (as ``save``/``save_peft`` name them), and peft's LoRA reproduces the outputs (full rank: exact)."""
    inner, full, want = adapted(where)
    x = L.inputs()
    exp = randlora.to_lora(full, rank="full")
    assert set(exp.layers) == layer_paths(L.host(inner, where))
    randlora.save_lora(full, tmp_path / "lora", rank="full")
    fresh = L.plain()
    pm = peft.PeftModel.from_pretrained(L.host(fresh, where), str(tmp_path / "lora")).eval()
    assert_close(L.out(pm if where == "root" else fresh, x), want, L.out(L.plain(), x), f"save_lora {L.name}/{where}")


# ------------------------------------------------------------------------------------------------
# single cases
# ------------------------------------------------------------------------------------------------
def test_adapter_saved_from_the_wrapper_loads_onto_the_bare_encoder(tmp_path):
    L = Layout("wrapper")
    inner, _ = L.adapted("root")
    x = L.inputs()
    path = randlora.save(inner, tmp_path / "a.safetensors")
    assert all(p.startswith("encoder.layers.") for p in file_layers(path))
    enc = randlora.load(L.plain_base(), path)
    assert layer_paths(enc) == {p.removeprefix("encoder.") for p in file_layers(path)}
    assert_close(L.base_out(enc, x), L.base_out(inner.encoder, x), L.base_out(L.plain_base(), x), "wrapper -> encoder")
    # and the encoder's own adapter (saved from the bare encoder) loads onto the wrapper's encoder
    again = randlora.save(enc, tmp_path / "b.safetensors")
    wrapped = randlora.load(L.plain(), again)
    assert randlora.paths.locate(wrapped)[0] == "encoder"
    assert_close(L.out(wrapped, x), L.out(inner, x), L.out(L.plain(), x), "encoder -> wrapper")


@pytest.mark.parametrize("order", ["compile_then_inject", "inject_then_compile", "compile_encoder_then_inject"])
def test_adapter_saved_from_a_compiled_model_has_no_orig_mod(order, tmp_path):
    """Whether the whole model or only its backbone (``model.encoder = torch.compile(model.encoder)``) is
    compiled, and before or after ``inject``: no ``_orig_mod`` in what is written, and the file loads into
    the plain model."""
    L = Layout("wrapper")
    m = L.plain()
    if order == "compile_then_inject":
        c = torch.compile(m, backend=BACKEND)
        randlora.inject(c, NET_TARGETS, **SETTINGS)
        assert randlora.paths.locate(c)[1] is m  # the adapter belongs to the model inside
    elif order == "inject_then_compile":
        randlora.inject(m, NET_TARGETS, **SETTINGS)
        c = torch.compile(m, backend=BACKEND)
    else:
        m.encoder = torch.compile(m.encoder, backend=BACKEND)
        randlora.inject(m, NET_TARGETS, **SETTINGS)
        c = m
    fill_adapter(m)
    x = L.inputs()
    want = L.out(m, x)
    keys = list(randlora.state_dict(c))
    path = randlora.save(c, tmp_path / "a.safetensors")
    tensors, cfg = randlora.checkpoint.read_file(path)
    randlora.save_peft(c, tmp_path / "peft")
    peft_keys = list(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    for what in (keys, list(tensors), cfg.targets, peft_keys, randlora.summary(c).split()):
        assert not any("_orig_mod" in k for k in what), what
    fresh = randlora.load(L.plain(), path)
    assert_close(L.out(fresh, x), want, L.out(L.plain(), x), f"{order} -> plain model")


def test_activation_checkpoint_wrappers_do_not_change_the_adapter(tmp_path):
    """torch's ``apply_activation_checkpointing`` puts ``_checkpoint_wrapped_module`` inside each block's path:
    the adapter's file names the layers without it, loads into the plain model, and a plain model's file
    loads into a wrapped one (the layers found through the wrapper)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    L = Layout("wrapper")
    x = L.inputs()
    wrapped = L.plain()
    apply_activation_checkpointing(wrapped, check_fn=lambda mod: isinstance(mod, Block))
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_modules())
    randlora.inject(wrapped, NET_TARGETS, **SETTINGS)
    fill_adapter(wrapped)
    want = L.out(wrapped, x)
    path = randlora.save(wrapped, tmp_path / "a.safetensors")
    tensors, cfg = randlora.checkpoint.read_file(path)
    for what in (list(tensors), cfg.targets):
        assert not any("_checkpoint_wrapped_module" in k for k in what), what
    plain = randlora.load(L.plain(), path)
    assert_close(L.out(plain, x), want, L.out(L.plain(), x), "checkpoint-wrapped -> plain")
    again = L.plain()
    apply_activation_checkpointing(again, check_fn=lambda mod: isinstance(mod, Block))
    randlora.load(again, randlora.save(plain, tmp_path / "b.safetensors"))
    assert_close(L.out(again, x), want, L.out(L.plain(), x), "plain -> checkpoint-wrapped")


def test_adapter_saved_from_a_ddp_model_has_no_module_prefix(ddp_group, tmp_path):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    m = Wrapped().eval()
    randlora.inject(m, NET_TARGETS, **SETTINGS)
    fill_adapter(m)
    ddp = DDP(m)
    keys = list(randlora.state_dict(ddp))
    path = randlora.save(ddp, tmp_path / "a.safetensors")
    tensors, cfg = randlora.checkpoint.read_file(path)
    randlora.save_peft(ddp, tmp_path / "peft")
    peft_keys = [k.removeprefix("base_model.model.")
                 for k in load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))]
    for what in (keys, list(tensors), cfg.targets, peft_keys):
        assert not any(k.startswith("module.") for k in what), what
    assert set(cfg.targets) == layer_paths(m)


def test_ambiguous_model_is_refused_naming_both_candidates_and_loads_with_prefix(tmp_path, capsys):
    L = Layout("bare")
    enc, _ = L.adapted("root")
    x = L.inputs()
    path = randlora.save(enc, tmp_path / "a.safetensors")
    twin = Twin()
    plain_twin = {k: v.clone() for k, v in twin.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        randlora.load(twin, path)
    assert "'a.'" in str(e.value) and "'b.'" in str(e.value), str(e.value)
    assert randlora.paths.locate(twin) is None  # left as it was
    assert not any(isinstance(m, RandLoraLinear) for m in twin.modules())

    randlora.load(twin, path, prefix=("", "a."))
    assert randlora.paths.locate(twin)[0] == "a"
    plain = L.plain()
    assert_close(L.out(twin.a, x), L.out(enc, x), L.out(plain, x), "twin.a")
    assert torch.equal(L.out(twin.b, x), L.out(plain, x))  # b untouched

    # the same through peft folders and the command line
    randlora.save_peft(enc, tmp_path / "peft")
    twin = Twin()
    with pytest.raises(CheckpointError) as e:
        randlora.load_peft(twin, tmp_path / "peft")
    assert "'a.'" in str(e.value) and "'b.'" in str(e.value), str(e.value)
    randlora.load_peft(twin, tmp_path / "peft", prefix=("", "b."))
    assert_close(L.out(twin.b, x), L.out(enc, x), L.out(plain, x), "peft twin.b")
    assert torch.equal(L.out(twin.a, x), L.out(plain, x))

    weights = tmp_path / "twin.safetensors"
    save_file(plain_twin, str(weights))
    out = tmp_path / "merged.safetensors"
    assert cli(["merge", "--base", str(weights), "--adapter", str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "'a.'" in err and "'b.'" in err and not out.exists(), err
    assert cli(["merge", "--base", str(weights), "--adapter", str(path), "--out", str(out), "--prefix", "a."]) == 0, \
        capsys.readouterr().err
    merged = Twin()
    merged.load_state_dict(load_file(str(out)))
    assert_close(L.out(merged.a, x), L.out(enc, x), L.out(plain, x), "merged twin.a")
    assert torch.equal(L.out(merged.b, x), L.out(plain, x))
