"""Real model families from ``transformers`` (small configs, random weights, no download): Llama, BERT,
ViT, CLIP and GPT-2 (``Conv1D``, weight stored ``(in, out)``). For each: inject with the family's usual
targets, train a few steps (the loss falls), merge (outputs equal the unmerged ones) and ``"all-linear"``
leaves the output head alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import randlora
from randlora.walker import adapted_layers
from reference import layer_delta

tf = pytest.importorskip("transformers", reason="the family tests build transformers models")

VOCAB, SEQ, IMG = 64, 8, 16


def _llama():
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ * 2,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tf.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=SEQ * 2, bos_token_id=1,
                        eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return tf.GPT2LMHeadModel(cfg)


def _bert():
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=SEQ * 2, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.BertForSequenceClassification(cfg)


def _vit():
    cfg = tf.ViTConfig(image_size=IMG, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48, num_labels=3, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return tf.ViTForImageClassification(cfg)


def _clip():
    cfg = tf.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=SEQ * 2, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0),
        vision_config=dict(image_size=IMG, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16)
    return tf.CLIPModel(cfg)


def _tokens(g, n=4):
    return torch.randint(3, VOCAB, (n, SEQ), generator=g)


def _pixels(g, n=4):
    return torch.randn(n, 3, IMG, IMG, generator=g)


# family -> (build, batch(generator) -> kwargs, usual targets, output head path, output of interest)
FAMILIES = {
    "llama": (_llama, lambda g: (lambda t: {"input_ids": t, "labels": t})(_tokens(g)),
              ["q_proj", "v_proj"], "lm_head", "logits"),
    "gpt2": (_gpt2, lambda g: (lambda t: {"input_ids": t, "labels": t})(_tokens(g)),
             ["c_attn"], "lm_head", "logits"),
    "bert": (_bert, lambda g: {"input_ids": _tokens(g), "labels": torch.randint(0, 3, (4,), generator=g)},
             ["query", "value"], "classifier", "logits"),
    "vit": (_vit, lambda g: {"pixel_values": _pixels(g), "labels": torch.randint(0, 3, (4,), generator=g)},
            ["q_proj", "v_proj"], "classifier", "logits"),
    "clip": (_clip, lambda g: {"input_ids": _tokens(g), "pixel_values": _pixels(g), "return_loss": True},
             # CLIP has no get_output_embeddings(): both projection heads are left out by name
             ["q_proj", "v_proj"], ("text_projection", "visual_projection"), "logits_per_image"),
}


def _build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    build, batch, targets, head, out = FAMILIES[family]
    model = build().float()
    return model, batch(torch.Generator().manual_seed(seed + 1)), targets, head, out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_then_merge(family):
    model, batch, targets, _, out = _build(family)
    base = copy.deepcopy(model)
    rep = randlora.inject(model, targets, r=4, alpha=32.0)
    assert rep.names and all(n.rsplit(".", 1)[-1] in targets for n in rep.names)
    assert rep.trainable == sum(p.numel() for p in randlora.trainable_parameters(model))
    model.train()
    opt = torch.optim.AdamW(randlora.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"{family}: loss did not fall: {losses}"
    # only the adapter trained; the base weights are untouched
    now = model.state_dict()
    for n, p in base.state_dict().items():
        assert torch.equal(p, now[n]), n
    model.eval()
    with torch.no_grad():
        y_eval = getattr(model(**batch), out)
    y_grad = getattr(model(**batch), out).detach()  # the autograd op's path, not the cached eval weight
    randlora.merge(model)
    assert not any(True for _ in adapted_layers(model)) and not hasattr(model, "randlora_A")
    assert list(model.state_dict()) == list(base.state_dict())
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    with torch.no_grad():
        y_merged = getattr(model(**batch), out)
        y_base = getattr(base.eval()(**batch), out)
    torch.testing.assert_close(y_merged, y_eval, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_merged, y_grad, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y_merged, y_base, rtol=1e-4, atol=1e-4)  # training did change the model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_linear_leaves_the_output_head(family):
    model, _, _, head, _ = _build(family)
    linear = [n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    rep = randlora.inject(model, "all-linear", r=4)
    heads = (head,) if isinstance(head, str) else head
    assert all(h in linear and h not in rep.names for h in heads)
    assert sorted(rep.names) == sorted(n for n in linear if n not in heads)
    if model.get_output_embeddings() is not None:
        assert model.get_output_embeddings() is model.get_submodule(heads[0])
        assert type(model.get_submodule(head)) is nn.Linear


def test_gpt2_conv1d_is_adapted_with_its_transposed_weight():
    model, batch, _, _, _ = _build("gpt2")
    model = model.double()
    conv = model.transformer.h[0].attn.c_attn
    assert type(conv).__name__ == "Conv1D" and conv.weight.shape == (32, 96)  # (in, out)
    W = conv.weight.detach().clone()
    randlora.inject(model, ["c_attn", "c_fc"], r=4)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and (layer.out_features, layer.in_features) == (96, 32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, l in adapted_layers(model):
            l.randlora_lambda.copy_(torch.randn(l.randlora_lambda.shape, generator=g, dtype=torch.float64))
            l.randlora_gamma.copy_(torch.randn(l.randlora_gamma.shape, generator=g, dtype=torch.float64))
    x = torch.randn(5, 32, dtype=torch.float64)
    ref = x @ (W.t() + layer_delta(layer)).t() + layer.bias.detach()  # float64 reference from the definition
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)
    y = model(**{k: v for k, v in batch.items() if k == "input_ids"}).logits
    randlora.merge(model)
    conv = model.transformer.h[0].attn.c_attn
    assert type(conv).__name__ == "Conv1D" and conv.weight.shape == (32, 96)
    torch.testing.assert_close(conv.weight.detach(), W + layer_delta(layer).t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(**{k: v for k, v in batch.items() if k == "input_ids"}).logits, y,
                               rtol=1e-10, atol=1e-10)


class Conv1D(nn.Module):  # not transformers': same layout, (in, out) weight
    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(nf, dtype=torch.float64))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


class Transposed(Conv1D):  # another name; says so with the attribute peft also uses
    fan_in_fan_out = True


@pytest.mark.parametrize("cls", [Conv1D, Transposed])
def test_a_conv1d_lookalike_without_transformers_is_detected(cls):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = cls(12, 7)

        def forward(self, x):
            return self.c_fc(x)

    model = Tiny()
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    randlora.inject(model, ["c_fc"], r=3)
    layer = model.c_fc
    assert isinstance(layer, randlora.RandLoraLinear)
    assert layer.fan_in_fan_out and (layer.out_features, layer.in_features) == (12, 7)
    with torch.no_grad():
        layer.randlora_lambda.normal_()
    W = layer.weight.detach().clone()
    torch.testing.assert_close(model(x), x @ (W + layer_delta(layer).t()) + layer.bias.detach(),
                               rtol=1e-10, atol=1e-10)
