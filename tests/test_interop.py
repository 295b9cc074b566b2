"""peft adapter folders in and out: train a few steps in one library, check the other's outputs (1e-5)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import randlora
from randlora.errors import CheckpointError, ConfigError, StateError, TargetError

peft = pytest.importorskip("peft", reason="peft is an optional test dependency (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")

TOL = 1e-5
TARGETS = ["q_proj", "up_proj", "down_proj"]  # O = I, O > I and O < I


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def llama_cfg():
    return transformers.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=97, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def base_state():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_cfg()).state_dict()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))


def fresh(state):
    m = transformers.LlamaForCausalLM(llama_cfg())
    m.load_state_dict(state)
    return m.eval()


def train(model, params, ids, steps=3):
    opt = torch.optim.AdamW(params, lr=2e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_config(mode="dense", save_projection=True, bias="none", **kw):
    return peft.RandLoraConfig(r=8, target_modules=TARGETS, save_projection=save_projection, bias=bias,
                               randlora_alpha=16, projection_prng_key=kw.pop("seed", 7), sparse=mode == "sparse",
                               very_sparse=mode == "very_sparse", **kw)


# --------------------------------------------------------------------------------------------------
# peft -> randlora
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,save_projection,bias,layers", [
    ("dense", True, "none", None),
    ("dense", False, "randlora_only", None),
    ("sparse", False, "all", [1]),
    ("sparse", True, "randlora_only", None),
    ("very_sparse", True, "all", None),
    ("very_sparse", False, "none", [0]),
])
def test_peft_trained_adapter_loads_with_equal_outputs(tmp_path, base_state, ids, mode, save_projection, bias, layers):
    pm = peft.get_peft_model(fresh(base_state), peft_config(mode, save_projection, bias, layers_to_transform=layers))
    train(pm, [p for p in pm.parameters() if p.requires_grad], ids)
    want = logits(pm, ids)
    pm.save_pretrained(tmp_path)
    model = randlora.load_peft(fresh(base_state), tmp_path)
    got = logits(model, ids)
    assert (got - want).abs().max().item() <= TOL
    assert (logits(fresh(base_state), ids) - want).abs().max().item() > 100 * TOL  # the adapter matters
    names = [n for n, _ in randlora.walker.adapted_layers(model)]
    expected = [n for n, _ in pm.base_model.model.named_modules()
                if isinstance(_, peft.tuners.randlora.layer.RandLoraLayer)]
    assert sorted(names) == sorted(expected)
    cfg = randlora.walker.config_of(model)
    assert (cfg.recipe, cfg.bases, cfg.seed, cfg.bias) == ("peft", mode, 7, bias)


def test_peft_bases_from_the_file_are_used(tmp_path, base_state, ids):
    """With saved bases, the file's bases win over regeneration (e.g. made on another device)."""
    pm = peft.get_peft_model(fresh(base_state), peft_config())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "randlora_lambda" in n:
                p.normal_()
        pm.base_model.randlora_B["default"].mul_(-1)  # bases peft's recipe would never produce
    want = logits(pm, ids)
    pm.save_pretrained(tmp_path)
    model = randlora.load_peft(fresh(base_state), tmp_path)
    assert (logits(model, ids) - want).abs().max().item() <= TOL
    sd = randlora.state_dict(model, save_projection=False)
    fresh_model = fresh(base_state)
    randlora.inject(fresh_model, "|".join(randlora.walker.config_of(model).targets), r=8, alpha=16, seed=7,
                    recipe="peft")
    with pytest.raises(randlora.FingerprintMismatch, match="checksum"):
        randlora.load_state_dict(fresh_model, sd)


def test_peft_conv1d_gpt2(tmp_path, ids):
    cfg = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=97, n_positions=32)
    torch.manual_seed(3)
    state = transformers.GPT2LMHeadModel(cfg).state_dict()

    def gpt2():
        m = transformers.GPT2LMHeadModel(cfg)
        m.load_state_dict(state)
        return m.eval()

    pc = peft.RandLoraConfig(r=8, target_modules=["c_attn", "c_fc", "mlp.c_proj"], fan_in_fan_out=True,
                             randlora_alpha=16, save_projection=False)
    pm = peft.get_peft_model(gpt2(), pc)
    train(pm, [p for p in pm.parameters() if p.requires_grad], ids)
    want = logits(pm, ids)
    pm.save_pretrained(tmp_path / "p")
    got = logits(randlora.load_peft(gpt2(), tmp_path / "p"), ids)
    assert (got - want).abs().max().item() <= TOL

    ours = gpt2()
    randlora.inject(ours, ["c_attn", "c_fc", "mlp.c_proj"], r=8, alpha=16, recipe="peft")
    train(ours, randlora.trainable_parameters(ours), ids)
    randlora.save_peft(ours, tmp_path / "o", save_projection=False)
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    pm2 = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "o")
    assert (logits(pm2, ids) - logits(ours, ids)).abs().max().item() <= TOL

    # Conv1D layers with fan_in_fan_out=false in the config: refused with the fix
    cj = tmp_path / "p" / "adapter_config.json"
    c = json.loads(cj.read_text())
    c["fan_in_fan_out"] = False
    cj.write_text(json.dumps(c))
    plain = gpt2()
    with pytest.raises(ConfigError, match="fan_in_fan_out"):
        randlora.load_peft(plain, tmp_path / "p")
    assert randlora.walker.bank_of(plain) is None


# --------------------------------------------------------------------------------------------------
# randlora -> peft
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,mode,save_projection,bias", [
    ("portable", "dense", True, "none"),
    ("portable", "sparse", True, "randlora_only"),
    ("portable", "very_sparse", True, "all"),
    ("peft", "dense", False, "all"),
    ("peft", "sparse", False, "none"),
    ("peft", "very_sparse", True, "randlora_only"),
])
def test_our_trained_adapter_loads_in_peft(tmp_path, base_state, ids, recipe, mode, save_projection, bias):
    model = fresh(base_state)
    randlora.inject(model, TARGETS, r=8, alpha=16, seed=5, bases=mode, recipe=recipe, bias=bias)
    train(model, randlora.trainable_parameters(model), ids)
    want = logits(model, ids)
    randlora.save_peft(model, tmp_path, save_projection=save_projection)
    pm = peft.PeftModel.from_pretrained(fresh(base_state), tmp_path)
    assert (logits(pm, ids) - want).abs().max().item() <= TOL
    assert (logits(fresh(base_state), ids) - want).abs().max().item() > 100 * TOL
    # and back: the folder round-trips into this library unchanged
    again = randlora.load_peft(fresh(base_state), tmp_path)
    assert (logits(again, ids) - want).abs().max().item() <= TOL


def test_duplicate_bases_silences_peft_missing_keys(tmp_path, base_state, ids):
    model = fresh(base_state)
    randlora.inject(model, TARGETS, r=8, alpha=16)
    for dup in (False, True):
        d = tmp_path / str(dup)
        randlora.save_peft(model, d, duplicate_bases=dup)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            peft.PeftModel.from_pretrained(fresh(base_state), d)
        missing = [w for w in rec if "missing adapter keys" in str(w.message)]
        assert bool(missing) is (not dup)
    small = (tmp_path / "False" / "adapter_model.safetensors").stat().st_size
    big = (tmp_path / "True" / "adapter_model.safetensors").stat().st_size
    assert big > 3 * small


def test_ambiguous_target_names_are_written_as_a_regex(tmp_path):
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)
            self.sub = Inner()

        def forward(self, x):
            return self.sub.q(self.q(x))

    torch.manual_seed(0)
    net = Outer()
    state = net.state_dict()
    randlora.inject(net, "q", r=4, alpha=8, recipe="peft")  # only the outer q: 'q' as a list entry would match both
    with torch.no_grad():
        net.q.randlora_lambda.normal_()
    randlora.save_peft(net, tmp_path, save_projection=False)
    tm = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(tm, str)
    other = Outer()
    other.load_state_dict(state)
    pm = peft.PeftModel.from_pretrained(other, tmp_path)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert (pm(x) - net(x)).abs().max().item() <= TOL


# --------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------
def test_save_peft_without_bases_needs_the_peft_recipe(tmp_path, base_state):
    model = fresh(base_state)
    randlora.inject(model, TARGETS, r=8, recipe="portable")
    with pytest.raises(ConfigError, match="recipe='portable'.*regenerate"):
        randlora.save_peft(model, tmp_path, save_projection=False)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_save_peft_without_bases_refuses_file_bases(tmp_path, base_state):
    model = fresh(base_state)
    randlora.inject(model, TARGETS, r=8)
    randlora.save_peft(model, tmp_path / "a")  # portable bases, saved
    loaded = randlora.load_peft(fresh(base_state), tmp_path / "a")  # recipe "peft", but the file's bases
    with pytest.raises(ConfigError, match="not the ones peft regenerates"):
        randlora.save_peft(loaded, tmp_path / "b", save_projection=False)


def _peft_folder(tmp_path, base_state, **kw):
    pm = peft.get_peft_model(fresh(base_state), peft_config(save_projection=False))
    pm.save_pretrained(tmp_path)
    cj = tmp_path / "adapter_config.json"
    c = json.loads(cj.read_text())
    c.update(kw)
    cj.write_text(json.dumps(c))
    return tmp_path


@pytest.mark.parametrize("change,err,match", [
    ({"modules_to_save": ["lm_head"]}, ConfigError, "modules_to_save"),
    ({"peft_type": "LORA"}, CheckpointError, "not RANDLORA"),
    ({"r": 0}, ConfigError, "r=0"),
    ({"bias": "some"}, ConfigError, "bias"),
])
def test_unsupported_peft_settings_are_refused(tmp_path, base_state, change, err, match):
    folder = _peft_folder(tmp_path, base_state, **change)
    model = fresh(base_state)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(err, match=match):
        randlora.load_peft(model, folder)
    assert randlora.walker.bank_of(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_folder_problems_are_refused(tmp_path, base_state):
    with pytest.raises(CheckpointError, match="not a folder"):
        randlora.load_peft(fresh(base_state), tmp_path / "nothing")
    folder = _peft_folder(tmp_path / "f", base_state)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        randlora.load_peft(fresh(base_state), folder)


def test_model_without_the_adapted_modules_is_refused(tmp_path, base_state):
    folder = _peft_folder(tmp_path, base_state)
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(CheckpointError, match="not this model's"):
        randlora.load_peft(other, folder)
    assert randlora.walker.bank_of(other) is None


def test_load_peft_on_an_adapted_model_is_refused(tmp_path, base_state):
    folder = _peft_folder(tmp_path, base_state)
    model = fresh(base_state)
    randlora.inject(model, ["q_proj"], r=8)
    with pytest.raises(StateError, match="already has"):
        randlora.load_peft(model, folder)


def test_bases_of_the_wrong_shape_are_refused(tmp_path, base_state):
    from safetensors.torch import load_file, save_file

    pm = peft.get_peft_model(fresh(base_state), peft_config())
    pm.save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    sd = load_file(f)
    sd = {k: (v[:, :, :-1].contiguous() if k.endswith("randlora_A") else v) for k, v in sd.items()}
    save_file(sd, f)
    model = fresh(base_state)
    with pytest.raises(CheckpointError, match="bases have shapes"):
        randlora.load_peft(model, tmp_path)
    assert randlora.walker.bank_of(model) is None
    assert not any(True for _ in randlora.walker.adapted_layers(model))


# --------------------------------------------------------------------------------------------------
# random linear stacks, random r and target subsets (hypothesis)
# --------------------------------------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class Stack(nn.Module):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        for l in self.layers:
            x = torch.tanh(l(x))
        return x


@settings(max_examples=6, deadline=None)
@given(widths=st.lists(st.integers(2, 40), min_size=3, max_size=5),
       mode=st.sampled_from(["dense", "sparse", "very_sparse"]), direction=st.sampled_from(["ours", "peft"]),
       save_projection=st.booleans(), data=st.data())
def test_random_stacks_interchange(tmp_path_factory, widths, mode, direction, save_projection, data):
    n = len(widths) - 1
    chosen = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))
    largest = max(max(widths[k], widths[k + 1]) for k in chosen)  # inject refuses r above it (test_errors.py)
    r = data.draw(st.integers(1, min(9, largest)), label="r")  # r > min(O, I) still drawn
    targets = [f"layers.{k}" for k in chosen]
    torch.manual_seed(0)
    state = Stack(widths).state_dict()

    def net():
        m = Stack(widths)
        m.load_state_dict(state)
        return m

    x = torch.randn(5, widths[0], generator=torch.Generator().manual_seed(2))
    d = tmp_path_factory.mktemp("stack")
    seed = data.draw(st.integers(0, 2**31))
    try:
        if direction == "ours":
            recipe = "peft" if not save_projection else data.draw(st.sampled_from(["peft", "portable"]))
            ours = net()
            randlora.inject(ours, targets, r=r, alpha=2.0 * r, seed=seed, bases=mode, recipe=recipe)
            with torch.no_grad():  # the scale peft's init_weights=False uses: λ ~ N(0, 1), γ ~ 1 / max(O, I)
                for _, l in randlora.walker.adapted_layers(ours):
                    l.randlora_lambda.normal_()
                    l.randlora_gamma.uniform_(0.5, 1.5).div_(max(l.out_features, l.in_features))
                want = ours(x)
            randlora.save_peft(ours, d, save_projection=save_projection)
            with torch.no_grad():
                got = peft.PeftModel.from_pretrained(net(), d)(x)
        else:
            pm = peft.get_peft_model(net(), peft.RandLoraConfig(
                r=r, target_modules=targets, init_weights=False, randlora_alpha=2 * r, projection_prng_key=seed,
                save_projection=save_projection, sparse=mode == "sparse", very_sparse=mode == "very_sparse"))
            with torch.no_grad():
                want = pm(x)
            pm.save_pretrained(d)
            with torch.no_grad():
                got = randlora.load_peft(net(), d)(x)
    except ConfigError as e:  # the peer's std normalisation is undefined on a tiny all-zero sparse draw
        assert "non-finite" in str(e)
        return
    if not torch.isfinite(want).all():
        return
    assert (got - want).abs().max().item() <= TOL
