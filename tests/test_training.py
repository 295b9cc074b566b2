"""Training the way users train, in combination: every setting against the route with nothing kept.

Each run trains a tiny transformers Llama (hidden 32, MLP 64: layers of widths 32 and 64) with an
all-linear adapter, and is compared with the same run (same optimiser, accumulation and checkpointing)
where every layer has ``keep="never"`` and no cache (the straightforward route: nothing built in one call
is used in another). Losses (training and
no-grad evaluation) and the final adapters must agree to 1e-5 relative (fp32).

Matrix: {plain loop, transformers ``Trainer``} × {SGD, AdamW for-loop, foreach, fused} × {gradient
accumulation 1, 4} × {no checkpointing, non-reentrant, reentrant} × {tokens per call below, between and
above the layer widths} × {with and without eval()/no-grad evaluation between steps} × {default
settings, inside ``randlora.cached``}; with ternary bases also the sparse route, and ``W + s·ΔW`` built
through their non-zeros. The Trainer part runs one
token count.
"""

from __future__ import annotations

import contextlib
import math
import dataclasses
import warnings
from unittest import mock

import pytest
import torch

import randlora
from randlora import core as layer_mod
from randlora import costs, planner

transformers = pytest.importorskip("transformers")

OPTIMIZERS = ("sgd", "adamw-for", "adamw-foreach", "adamw-fused")
CHECKPOINTING = ("none", "non-reentrant", "reentrant")
TOKENS = {"below": (1, 16), "between": (2, 24), "above": (2, 80)}  # (batch, seq): T = 16, 48, 160
STEPS = 3
VOCAB = 64


def _model(ckpt: str = "none", keep_never: bool = False, bases: str = "dense", path: str = "auto"):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(conf)
    randlora.inject(model, "all-linear", r=8, bases=bases)
    for _, layer in randlora.walker.adapted_layers(model):
        layer.set_path(path)
        if keep_never:
            layer.set_keep("never")
    if ckpt != "none":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": ckpt == "reentrant"})
    return model


def _optimizer(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    flags = {"adamw-for": dict(foreach=False), "adamw-foreach": dict(foreach=True), "adamw-fused": dict(fused=True)}
    return torch.optim.AdamW(params, lr=1e-3, **flags[kind])  # the rate to start from with the default alpha


def _batches(tokens: str, n: int) -> list[torch.Tensor]:
    b, t = TOKENS[tokens]
    g = torch.Generator().manual_seed(1)
    return [torch.randint(VOCAB, (b, t), generator=g) for _ in range(n)]


def _loop(opt_kind: str, accum: int, ckpt: str, tokens: str, evals: bool, mode: str, bases: str = "dense"):
    """Train ``STEPS`` optimiser steps; returns (losses, final adapter tensors)."""
    model = _model(ckpt, keep_never=mode == "reference", bases=bases, path="sparse" if mode == "sparse" else "auto")
    params = randlora.trainable_parameters(model)
    opt = _optimizer(opt_kind, params)
    data = _batches(tokens, STEPS * accum)
    probe = _batches("between", 1)[0].flip(0)
    losses = []
    with randlora.cached(model) if mode == "cached" else contextlib.nullcontext():
        for step in range(STEPS):
            model.train()
            for k in range(accum):
                ids = data[step * accum + k]
                loss = model(input_ids=ids, labels=ids).loss / accum
                loss.backward()
                losses.append(loss.item())
            opt.step()
            opt.zero_grad()
            if evals:
                model.eval()
                with torch.no_grad():
                    losses.append(model(input_ids=probe, labels=probe).loss.item())
        with torch.no_grad():  # after the last step, in whatever mode the loop left the model
            losses.append(model(input_ids=probe, labels=probe).loss.item())
    return losses, [p.detach().clone() for p in params]


def _agree(got, want) -> None:
    losses, params = got
    ref_losses, ref_params = want
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor(ref_losses, dtype=torch.float64), rtol=1e-5, atol=0)
    assert len(params) == len(ref_params)
    for p, q in zip(params, ref_params):
        err = (p.double() - q.double()).norm() / max(q.double().norm(), 1e-30)
        assert err <= 1e-5, f"adapter differs by {err:.2e} relative"
    # the run trained: the adapters moved
    assert any(q.abs().max() > 0 for q in ref_params[::2])


_REFERENCE: dict = {}


def _reference(opt_kind, accum, ckpt, tokens, evals, bases="dense"):
    """The same run with nothing kept: same checkpointing too, since re-entrant checkpointing accumulates the
    micro-batches' gradients in another order (fp32 rounding that AdamW then amplifies)."""
    key = (opt_kind, accum, ckpt, tokens, evals, bases)
    if key not in _REFERENCE:
        _REFERENCE[key] = _loop(opt_kind, accum, ckpt, tokens, evals, "reference", bases)
    return _REFERENCE[key]


@pytest.mark.parametrize("evals", [False, True], ids=["train-only", "eval-between"])
@pytest.mark.parametrize("tokens", list(TOKENS))
@pytest.mark.parametrize("ckpt", CHECKPOINTING)
@pytest.mark.parametrize("accum", [1, 4])
@pytest.mark.parametrize("opt_kind", OPTIMIZERS)
def test_plain_loop_matches_the_route_with_nothing_kept(opt_kind, accum, ckpt, tokens, evals):
    want = _reference(opt_kind, accum, ckpt, tokens, evals)
    for mode in ("default", "cached"):
        _agree(_loop(opt_kind, accum, ckpt, tokens, evals, mode), want)


@pytest.mark.parametrize("tokens", list(TOKENS))
@pytest.mark.parametrize("ckpt", CHECKPOINTING)
@pytest.mark.parametrize("accum", [1, 4])
@pytest.mark.parametrize("opt_kind", ["sgd", "adamw-fused"])
def test_sparse_route_in_the_loop_matches_the_dense_route(opt_kind, accum, ckpt, tokens):
    """Ternary bases: the sparse route (forced), and ``auto``, against the dense route with nothing kept."""
    want = _reference(opt_kind, accum, ckpt, tokens, True, "very_sparse")
    for mode in ("sparse", "default"):
        _agree(_loop(opt_kind, accum, ckpt, tokens, True, mode, "very_sparse"), want)


@pytest.mark.parametrize("tokens", list(TOKENS))
@pytest.mark.parametrize("ckpt", CHECKPOINTING)
@pytest.mark.parametrize("accum", [1, 4])
@pytest.mark.parametrize("opt_kind", ["sgd", "adamw-foreach"])
def test_builds_through_the_non_zeros_in_the_loop_match_the_dense_route(opt_kind, accum, ckpt, tokens, monkeypatch):
    """Ternary bases whose ``W + s·ΔW`` is built through their non-zeros (made cheap here, so that these narrow
    layers take that build, keep it in the training steps that may and prebuild it in the eval calls), against
    the dense route with nothing kept."""
    want = _reference(opt_kind, accum, ckpt, tokens, True, "very_sparse")
    cpu = costs.DEVICE_COSTS["cpu"]
    monkeypatch.setitem(costs.DEVICE_COSTS, "cpu", dataclasses.replace(cpu, build_weight=1e-3))
    spy = mock.Mock(wraps=layer_mod.sparse_delta)
    monkeypatch.setattr(layer_mod, "sparse_delta", spy)
    _agree(_loop(opt_kind, accum, ckpt, tokens, True, "default", "very_sparse"), want)
    assert spy.call_count > 0


# ------------------------------------------------------------------------------------------------
# transformers Trainer
# ------------------------------------------------------------------------------------------------
class _Ids(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.rows = [t[0] for t in _batches("between", n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _trainer_run(tmp_path, opt_kind: str, accum: int, ckpt: str, mode: str):
    from transformers import Trainer, TrainingArguments

    model = _model(keep_never=mode == "reference")
    opt = None if opt_kind == "default" else _optimizer(opt_kind, randlora.trainable_parameters(model))
    args = TrainingArguments(
        output_dir=str(tmp_path / mode), per_device_train_batch_size=2, per_device_eval_batch_size=2,
        gradient_accumulation_steps=accum, max_steps=STEPS, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=1, eval_strategy="steps", eval_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=ckpt != "none",
        gradient_checkpointing_kwargs={"use_reentrant": ckpt == "reentrant"} if ckpt != "none" else None,
    )  # optim defaults to adamw_torch_fused: the "default" run uses it
    trainer = Trainer(model=model, args=args, train_dataset=_Ids(2 * STEPS * accum), eval_dataset=_Ids(4),
                      optimizers=(opt, None))
    with warnings.catch_warnings(), (randlora.cached(model) if mode == "cached" else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        trainer.train()
    if opt_kind == "default":
        assert "fused" in type(trainer.optimizer).__name__.lower() or trainer.optimizer.defaults.get("fused")
    logs = [h[k] for h in trainer.state.log_history for k in ("loss", "eval_loss") if k in h]
    assert len(logs) >= 2 * STEPS and all(math.isfinite(v) for v in logs)
    return logs, [p.detach().clone() for p in randlora.trainable_parameters(model)]


@pytest.mark.parametrize("ckpt", CHECKPOINTING)
@pytest.mark.parametrize("accum", [1, 4])
@pytest.mark.parametrize("opt_kind", ("default",) + OPTIMIZERS)
def test_trainer_matches_the_route_with_nothing_kept(tmp_path, opt_kind, accum, ckpt):
    if opt_kind not in ("default", "adamw-fused") and (accum, ckpt) != (4, "non-reentrant"):
        pytest.skip("the other optimisers run one combination; fused (the Trainer default) runs them all")
    want = _trainer_run(tmp_path, opt_kind, accum, ckpt, "reference")
    for mode in ("default", "cached"):
        _agree(_trainer_run(tmp_path, opt_kind, accum, ckpt, mode), want)


# ------------------------------------------------------------------------------------------------
# the reported failures, one by one
# ------------------------------------------------------------------------------------------------
def _merged_copy_out(model, ids):
    import copy

    twin = copy.deepcopy(model)
    randlora.merge(twin)
    with torch.no_grad():
        return twin(input_ids=ids).logits


@pytest.mark.parametrize("mode", ["default", "cached"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_data_writes_and_weight_swaps_are_seen(mode, train_mode):
    """``.data`` writes to λ/γ and to the frozen weight, and ``weight.data = ...`` swaps, change outputs."""
    model = _model()
    model.train(train_mode)
    ids = _batches("above", 1)[0]
    layers = [l for _, l in randlora.walker.adapted_layers(model)]
    with randlora.cached(model) if mode == "cached" else contextlib.nullcontext():
        with torch.no_grad():
            model(input_ids=ids)  # populate whatever could be kept
            for i, l in enumerate(layers):
                l.randlora_lambda.data.normal_(0, 0.05)  # an EMA-style write: no version bump
                l.randlora_gamma.data.mul_(1.0 + 0.1 * i)
            layers[0].weight.data = layers[0].weight.data * 1.5  # storage swap (FSDP1/DeepSpeed style)
            layers[1].weight.data.add_(0.01)
            for grad in (False, True):
                with torch.set_grad_enabled(grad):
                    got = model(input_ids=ids).logits.detach()
                want = _merged_copy_out(model, ids)
                err = (got - want).norm() / want.norm()
                assert err < 1e-5, f"grad={grad}: relative error {err:.2e} against a merged copy"


@pytest.mark.parametrize("mode", ["default", "cached"])
@pytest.mark.parametrize("opt_kind", OPTIMIZERS)
def test_an_optimizer_step_in_eval_mode_is_seen(mode, opt_kind):
    model = _model()
    model.eval()  # and it stays in eval mode: no train() call anywhere
    opt = _optimizer(opt_kind, randlora.trainable_parameters(model))
    ids = _batches("above", 1)[0]
    with randlora.cached(model) if mode == "cached" else contextlib.nullcontext():
        for _ in range(2):
            with torch.no_grad():
                before = model(input_ids=ids).logits
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                after = model(input_ids=ids).logits
            want = _merged_copy_out(model, ids)
            assert (after - want).norm() / want.norm() < 1e-5
    assert not torch.equal(before, after)


@pytest.mark.parametrize("mode", ["default", "cached"])
def test_gradient_checkpointing_between_widths_does_not_crash(mode):
    """Non-reentrant checkpointing (transformers' default) with T < O <= 3T tokens per call: the recompute
    must save what the first forward saved, micro-batch after micro-batch."""
    model = _model("non-reentrant")
    opt = _optimizer("adamw-fused", randlora.trainable_parameters(model))
    ids = _batches("between", 1)[0]  # T = 48: between the widths 32 and 64 (64 <= 3 · 48)
    with randlora.cached(model) if mode == "cached" else contextlib.nullcontext():
        for _ in range(2):
            for _ in range(3):  # accumulation: unchanged parameters between micro-batches
                model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
