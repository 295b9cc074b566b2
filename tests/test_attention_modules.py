"""No adapter silently does nothing inside torch's attention modules (issue 31).

``nn.MultiheadAttention`` reads ``out_proj.weight`` instead of calling ``out_proj``, and the fused fast paths of
``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` (eval under ``no_grad``) read ``linear1``,
``linear2`` and ``out_proj`` weights directly (randlora/attention.py). Over the encoder layer (``batch_first``
and ``norm_first`` both ways, with a key padding mask), an encoder stack (nested tensors on), the decoder
layer, a bare ``nn.MultiheadAttention`` (``need_weights`` both ways), a subclass that calls its ``out_proj``
itself and a torchvision-ViT-style block, with ``λ``/``γ`` perturbed, in train and eval, with and without
grad: the adapted output equals a float64 reference (the base model with each layer's reference ``s·ΔW``
added to a copy of its weight), every adapted layer's term changes that reference, and every ``λ``/``γ``
gets the reference's gradient. Then: merge equals the adapted model and takes torch's fast paths again, eject
gives the base model back bit for bit, a saved adapter loads into a fresh copy; refusals leave the model as
it was. ``"all-linear"`` on headless models leaves out no layer of their blocks; a tied output head is refused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers as tf
from torch import nn
from torch.func import functional_call

import randlora
from randlora.attention import guarded
from randlora.walker import adapted_layers

from models import randomize
from reference import reference_delta
from test_errors import assert_unchanged, snapshot

D, H, FF, B, S = 8, 2, 16, 3, 5


class ViTBlock(nn.Module):
    """torchvision's ViT ``EncoderBlock``, written out: LayerNorm → MHA (batch_first) → residual → MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(D)
        self.self_attention = nn.MultiheadAttention(D, H, batch_first=True)
        self.ln_2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Linear(FF, D))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class CallsOutProj(nn.MultiheadAttention):
    """An attention subclass that also calls its ``out_proj`` module (the layer must not add its term twice)."""

    def forward(self, q, k, v, **kw):
        return self.out_proj(super().forward(q, k, v, **kw)[0])


@dataclass
class Case:
    build: Callable[[], nn.Module]
    run: Callable  # (model, x (B, S, D), pad (B, S) bool) -> output(s), batch first
    pad: bool = True  # compare only the rows the padding mask keeps


def _bf(y, batch_first):
    return y if batch_first else y.transpose(0, 1)


def _enc_layer(batch_first, norm_first):
    return Case(lambda: nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=batch_first,
                                                   norm_first=norm_first),
                lambda m, x, pad: _bf(m(_bf(x, batch_first), src_key_padding_mask=pad), batch_first))


def _decoder(m, x, pad):
    return m(x, x.flip(1), tgt_key_padding_mask=pad, memory_key_padding_mask=pad)


CASES = {
    **{f"encoder_layer-bf{int(bf)}-nf{int(nf)}": _enc_layer(bf, nf) for bf in (True, False) for nf in (True, False)},
    "encoder_stack": Case(lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, FF, dropout=0.0,
                                                                                   batch_first=True), 2),
                          lambda m, x, pad: m(x, src_key_padding_mask=pad)),
    "decoder_layer": Case(lambda: nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, batch_first=True), _decoder),
    "mha-weights": Case(lambda: nn.MultiheadAttention(D, H, batch_first=True),
                        lambda m, x, pad: m(x, x, x, key_padding_mask=pad, need_weights=True)),
    "mha-no-weights": Case(lambda: nn.MultiheadAttention(D, H, batch_first=True),
                           lambda m, x, pad: m(x, x, x, key_padding_mask=pad, need_weights=False)[0]),
    "mha-calls-out_proj": Case(lambda: CallsOutProj(D, H, batch_first=True), lambda m, x, pad: m(x, x, x),
                               pad=False),
    "vit_block": Case(ViTBlock, lambda m, x, pad: m(x), pad=False),
}
MODES = [("train", True), ("train", False), ("eval", True), ("eval", False)]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 3:] = True  # left-aligned padding (the stack's nested path needs it)
    return x, pad


def _outs(y) -> tuple:
    """A module's output(s) as a tuple (``nn.MultiheadAttention`` returns the attention weights too)."""
    return y if isinstance(y, tuple) else (y,)


def _kept(y, pad, case):
    """The output rows to compare: all, or those the padding mask keeps (a nested-tensor path zeroes the rest)."""
    y = _outs(y)[0]
    return y[~pad] if case.pad else y


def _adapted(name: str, seed: int = 1):
    torch.manual_seed(0)
    base = CASES[name].build()
    model = copy.deepcopy(base)
    rep = randlora.inject(model, "all-linear", r=2)
    # every linear layer is adapted: these models have no head, and out_proj is no exception
    assert rep.names == [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    randomize(model, seed)
    return base, model


def _reference(base: nn.Module, model: nn.Module, x, pad, case, without: str | None = None):
    """``case.run`` on the float64 base model with ``W + s·ΔW`` (tests/reference.py) in every adapted layer but
    ``without`` (by ``torch.func.functional_call``); returns the output and the leaf ``λ``/``γ`` by path."""
    plain = copy.deepcopy(base).double().train(model.training)
    params, leaves = {}, {}
    for path, layer in adapted_layers(model):
        lam = layer.randlora_lambda.detach().double().requires_grad_()
        gam = layer.randlora_gamma.detach().double().requires_grad_()
        leaves[path] = (lam, gam)
        W = plain.get_submodule(path).weight.detach()
        if path != without:
            W = W + reference_delta(lam, gam, layer.bank.A, layer.bank.B, layer.out_features, layer.in_features,
                                    layer.scaling)
        params[f"{path}.weight"] = W
    return case.run(lambda *a, **kw: functional_call(plain, params, a, kw), x, pad), leaves


def _loss(outputs):
    """A fixed random projection of each output (a sum of squares of a LayerNorm output barely depends on it)."""
    g = torch.Generator().manual_seed(7)
    return sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum() for t in outputs)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the reference's no-grad stack
@pytest.mark.parametrize("mode,grad", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_every_adapted_layer_is_applied(name, mode, grad):
    case = CASES[name]
    base, model = _adapted(name)
    model.train(mode == "train")
    check_applied(base, model, case, grad, _reference)


def check_applied(base: nn.Module, model: nn.Module, case, grad: bool, reference) -> None:
    """The adapted model's outputs and λ/γ gradients equal ``reference``'s (a float64 functional call of ``base``
    with ``ΔW`` added to each adapted weight), and dropping any one adapted weight's term moves the output by far
    more than the tolerance: every adapted weight is applied."""
    x, pad = _inputs()
    with torch.set_grad_enabled(grad):
        y = case.run(model, x.float(), pad)
    ref, leaves = reference(base, model, x, pad, case)
    for got, want in zip(_outs(y), _outs(ref)):
        torch.testing.assert_close(_kept(got, pad, case).double(), _kept(want, pad, case), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # each adapted weight's term moves the output by far more than that tolerance
        for path in leaves:
            off, _ = reference(base, model, x, pad, case, without=path)
            assert (_kept(off, pad, case) - _kept(ref, pad, case)).abs().max() > 1e-3, path
    if not grad:
        return
    _loss(tuple(_kept(t, pad, case) for t in _outs(y))).backward()
    _loss(tuple(_kept(t, pad, case) for t in _outs(ref))).backward()
    for path, layer in adapted_layers(model):
        for p, leaf in zip((layer.randlora_lambda, layer.randlora_gamma), leaves[path]):
            assert p.grad is not None and p.grad.abs().max() > 0, path
            torch.testing.assert_close(p.grad.double(), leaf.grad, rtol=1e-4, atol=1e-6 * leaf.grad.abs().max())


# ------------------------------------------------------------------------------------------------
# torch's fast paths: off while adapted, on again after merge / eject
# ------------------------------------------------------------------------------------------------
FUSED = ("_transformer_encoder_layer_fwd", "_nested_tensor_from_mask", "_native_multi_head_attention")


@pytest.fixture
def fused(monkeypatch):
    """Counts of torch's fused kernels called (each wrapped by a counting function)."""
    calls = dict.fromkeys(FUSED, 0)
    for name in FUSED:
        def counted(*a, _f=getattr(torch, name), _n=name, **kw):
            calls[_n] += 1
            return _f(*a, **kw)
        monkeypatch.setattr(torch, name, counted)
    return calls


def _eval_run(model, case, x, pad, fused):
    for k in fused:
        fused[k] = 0
    with torch.no_grad():
        y = case.run(model.eval(), x, pad)
    return y, {k: v for k, v in fused.items() if v}


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("name,fast", [("encoder_layer-bf1-nf0", {"_transformer_encoder_layer_fwd": 1}),
                                       ("encoder_stack", {"_transformer_encoder_layer_fwd": 2,
                                                          "_nested_tensor_from_mask": 1}),
                                       ("vit_block", {"_native_multi_head_attention": 1})])
def test_merged_and_ejected_models_take_the_fast_paths_again(fused, name, fast):
    case = CASES[name]
    base, model = _adapted(name)
    x, pad = _inputs()
    x = x.float()
    y0, calls = _eval_run(base, case, x, pad, fused)
    assert calls == fast  # the plain model takes torch's fused path
    y, calls = _eval_run(model, case, x, pad, fused)
    # adapted: the encoder layer's fused kernel and the nested tensors are off; nn.MultiheadAttention's own
    # kernel still runs, on out_proj's W + s·ΔW
    assert calls == {k: v for k, v in fast.items() if k == "_native_multi_head_attention"}
    ref, _ = _reference(base, model, x.double(), pad, case)
    torch.testing.assert_close(_kept(y, pad, case).double(), _kept(ref, pad, case), rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(model)  # the hooks travel with a copy
    assert torch.equal(_eval_run(twin, case, x, pad, fused)[0], y)
    randlora.merge(model)
    assert not any(guarded(m) for m in model.modules())
    y_merged, calls = _eval_run(model, case, x, pad, fused)
    assert calls == fast
    torch.testing.assert_close(_kept(y_merged, pad, case), _kept(y, pad, case), rtol=1e-5, atol=1e-5)
    randlora.eject(twin)
    assert not any(guarded(m) for m in twin.modules())
    y_ejected, calls = _eval_run(twin, case, x, pad, fused)
    assert calls == fast and torch.equal(y_ejected, y0)


@pytest.mark.parametrize("name", list(CASES))
def test_merge_eject_and_a_saved_adapter(name, tmp_path):
    case = CASES[name]
    base, model = _adapted(name)
    x, pad = _inputs()
    x = x.float()
    for mode in (True, False):  # train and eval, with grad
        model.train(mode), base.train(mode)
        y = case.run(model, x, pad)
        randlora.save(model, tmp_path / "a.safetensors")
        fresh = copy.deepcopy(base)
        randlora.load(fresh, tmp_path / "a.safetensors")
        for got, want in zip(_outs(case.run(fresh, x, pad)), _outs(y)):
            assert torch.equal(got, want)
        randlora.merge(fresh)
        for got, want in zip(_outs(case.run(fresh, x, pad)), _outs(y)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    randlora.eject(model)
    for got, want in zip(_outs(case.run(model, x, pad)), _outs(case.run(base, x, pad))):
        assert torch.equal(got, want)
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]


# ------------------------------------------------------------------------------------------------
# refusals (also rows of docs/errors.md's table, tests/test_errors.py)
# ------------------------------------------------------------------------------------------------
def test_adapter_dropout_on_out_proj_is_refused_in_training():
    torch.manual_seed(0)
    model = ViTBlock()
    randlora.inject(model, "all-linear", r=2, dropout=0.1)
    randomize(model, 1)
    x, _ = _inputs()
    before = snapshot(model)
    with pytest.raises(randlora.ConfigError, match=r"out_proj.*dropout=0.*exclude=\['out_proj'\]"):
        model(x.float())
    assert_unchanged(before, snapshot(model))
    layer = model.self_attention.out_proj
    assert isinstance(layer.weight, nn.Parameter) and not layer.disabled
    model.eval()  # dropout does nothing in eval: the adapter applies
    torch.manual_seed(0)
    ref, _ = _reference(ViTBlock(), model, x, None, CASES["vit_block"])
    torch.testing.assert_close(model(x.float()).double(), ref, rtol=1e-5, atol=1e-5)


def test_per_row_adapters_on_out_proj_are_refused():
    base, model = _adapted("vit_block")
    randlora.inject(model, "all-linear", r=2, name="b")
    x, _ = _inputs()
    with pytest.raises(randlora.StateError, match="randlora.mixed.*out_proj.*randlora.use"):
        with randlora.mixed(model, ["default", "b", None]):
            model(x.float())


def test_a_tied_output_head_is_refused():
    cfg = tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = snapshot(model)
    with pytest.raises(randlora.TargetError) as e:
        randlora.inject(model, ["q_proj", "lm_head"], r=4)
    msg = str(e.value)
    assert msg.startswith("target 'lm_head' has a tied weight") and "'model.embed_tokens.weight'" in msg
    assert "tie_word_embeddings=False" in msg and "exclude=['lm_head']" in msg and len(msg) < 1500
    assert_unchanged(before, snapshot(model))
    assert "lm_head" not in randlora.inject(model, "all-linear", r=4).names  # left out, as before


# ------------------------------------------------------------------------------------------------
# "all-linear" on headless models: no layer of the blocks is left out
# ------------------------------------------------------------------------------------------------
def _llama_model():
    return tf.LlamaModel(tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))


def _bert_model():
    return tf.BertModel(tf.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=24, max_position_embeddings=16))


def _vit_model():
    return tf.ViTModel(tf.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=24))


class _Stack(nn.Module):
    """Numbered blocks, then an output layer: the last linear layer, after the blocks, is the head."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(D, D), nn.Linear(D, D)) for _ in range(n)])
        self.out = nn.Linear(D, 2)


HEADLESS = {"LlamaModel": _llama_model, "BertModel": _bert_model, "ViTModel": _vit_model,
            "TransformerEncoder": CASES["encoder_stack"].build, "TransformerEncoderLayer": CASES[
                "encoder_layer-bf1-nf0"].build, "MultiheadAttention": CASES["mha-no-weights"].build}


@pytest.mark.parametrize("name", list(HEADLESS))
def test_all_linear_on_headless_models_leaves_out_nothing(name):
    torch.manual_seed(0)
    model = HEADLESS[name]()
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert randlora.inject(model, "all-linear", r=4).names == linear


@pytest.mark.parametrize("n", [1, 3])
def test_all_linear_leaves_out_the_layer_after_the_blocks(n):
    model = _Stack(n)
    names = randlora.inject(model, "all-linear", r=4).names
    assert names == [f"blocks.{i}.{j}" for i in range(n) for j in range(2)]
    mlp = nn.Sequential(nn.Linear(D, FF), nn.ReLU(), nn.Linear(FF, D), nn.ReLU(), nn.Linear(D, 2))
    assert randlora.inject(mlp, "all-linear", r=4).names == ["0", "2"]  # a stack of layers: its last is the output


def test_an_attention_call_that_fails_gives_out_proj_its_weight_back():
    base, model = _adapted("mha-no-weights")
    layer = model.out_proj
    W = layer.weight
    x = torch.randn(B, S, D + 1)  # the wrong width: torch refuses it after the pre-hook swapped the weight
    with pytest.raises(AssertionError, match="embedding dimension"):
        model(x, x, x)
    assert layer.weight is W and isinstance(W, nn.Parameter) and not layer.disabled


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_deleting_the_only_adapter_of_an_encoder_layer_gives_it_the_fast_path_back(fused):
    """``randlora.delete`` that unwraps every adapted layer of one encoder layer, while another adapter lives
    elsewhere in the model, takes the hooks off that layer (and leaves them where an adapter remains)."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True) for _ in range(2)))
    model.eval()
    randlora.inject(model, ["0.linear1", "1.linear1"], r=4)
    randlora.inject(model, ["1.linear1"], r=4, name="b")  # (a further adapter goes on layers the first has)
    assert guarded(model[0]) and guarded(model[1])
    randlora.delete(model, "default")
    assert not guarded(model[0]) and guarded(model[1])
    x = torch.randn(2, 5, D)
    for k in fused:
        fused[k] = 0
    with torch.no_grad():
        model[0](x)
    assert fused["_transformer_encoder_layer_fwd"] == 1
