"""A Trainer checkpoint folder loads as the trained model: the adapter and what was trained beside it.

``randlora.hf.RandLoraTrainer`` writes, beside ``randlora_adapter.safetensors``, the parameters the model
trains outside the adapter (``randlora_trainable.safetensors``: here a classification head outside the
injected encoder). ``randlora.load(model, folder)`` restores both where the model has them, names them at
INFO, skips (and says so at WARNING) what lies outside the model it is given, and refuses, changing nothing, what
belongs in it but does not fit; ``python -m randlora merge`` writes the head into its output or refuses.
One Trainer run of 2 steps on a tiny BERT serves every test.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import randlora
from randlora.__main__ import main as cli
from randlora.errors import CheckpointError

transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")

from randlora.hf import ADAPTER_FILE, EXTRA_FILE, ROOT_KEY, trainer_class  # noqa: E402
from test_errors import assert_unchanged, snapshot  # noqa: E402

D, CLASSES, VOCAB, SEQ = 16, 3, 40, 8
TOL = 1e-6


class Classifier(nn.Module):
    """A tiny BERT encoder and a classification head outside it (``inject(model.encoder, ...)`` leaves the
    head trainable: the Trainer trains it beside the adapter)."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=24, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
        self.encoder = transformers.BertModel(cfg)
        self.head = nn.Linear(D, classes)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.encoder(input_ids=input_ids).last_hidden_state[:, 0])
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)["logits"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(trained model, its checkpoint folder, inputs)`` after 2 Trainer steps."""
    out = tmp_path_factory.mktemp("run")
    model = Classifier()
    randlora.inject(model.encoder, ["query", "value"], r=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (16, SEQ), generator=g)
    data = [{"input_ids": i, "labels": int(i[0]) % CLASSES} for i in ids]
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=8, learning_rate=5e-2, save_steps=2,
        logging_strategy="no", use_cpu=True, report_to=[], seed=0, disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer_class()(model=model, args=args, train_dataset=data).train()
    return model.eval(), out / "checkpoint-2", ids[:4]


def folder_records(caplog, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "randlora" and r.levelno == level]


def test_the_folder_records_where_the_adapter_sits(trained):
    _, ckpt, _ = trained
    with safe_open(str(ckpt / EXTRA_FILE), "pt") as f:
        assert f.metadata()[ROOT_KEY] == "encoder." and set(f.keys()) == {"head.weight", "head.bias"}


def test_a_folder_loads_as_the_trained_model_and_says_which_files(trained, caplog):
    model, ckpt, x = trained
    want = logits(model, x)
    adapter_only = logits(randlora.load(Classifier(), ckpt / ADAPTER_FILE), x)
    assert (adapter_only - want).abs().max().item() > 1e-2  # the trained head matters: without it, another model
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="randlora"):
        fresh = randlora.load(Classifier(), ckpt)
    assert (logits(fresh, x) - want).abs().max().item() <= TOL
    assert not folder_records(caplog)  # everything restored: nothing to warn about, the files named at INFO
    (msg,) = [m for m in folder_records(caplog, logging.INFO) if "checkpoint folder" in m]
    assert ADAPTER_FILE in msg and f"2 of the 2 tensors of {EXTRA_FILE} ('head.bias', 'head.weight')" in msg, msg
    assert "NOT loaded" not in msg
    # into a model already adapted the same way (the load_state_dict branch) the head comes too
    again = Classifier()
    randlora.inject(again.encoder, ["query", "value"], r=4)
    randlora.load(again, ckpt)
    assert (logits(again, x) - want).abs().max().item() <= TOL


def test_into_the_bare_encoder_the_head_is_skipped_at_warning(trained, caplog):
    model, ckpt, x = trained
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="randlora"):
        enc = randlora.load(Classifier().encoder, ckpt)
    with torch.no_grad():
        got, want = enc(input_ids=x).last_hidden_state, model.encoder(input_ids=x).last_hidden_state
    assert (got - want).abs().max().item() <= TOL
    (msg,) = folder_records(caplog)
    assert f"NOT loaded: 2 of the 2 tensors of {EXTRA_FILE} ('head.bias', 'head.weight')" in msg, msg
    assert "Load the folder into the whole model the Trainer trained" in msg


@pytest.mark.parametrize("inject", [False, True], ids=["plain", "injected"])
def test_a_head_that_does_not_fit_is_refused_and_changes_nothing(trained, inject):
    _, ckpt, _ = trained
    model = Classifier(classes=5)
    if inject:
        randlora.inject(model.encoder, ["query", "value"], r=4)
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        randlora.load(model, ckpt)
    msg = str(info.value)
    assert msg.startswith(f"{ckpt / EXTRA_FILE} holds 2 parameters trained beside the adapter"), msg
    assert "2 have other shapes (head.bias is (3,) in the file, (5,) here)" in msg
    assert f"randlora.load(model, '{ckpt / ADAPTER_FILE}')" in msg and len(msg) <= 1500
    assert_unchanged(before, snapshot(model))


def test_a_folder_written_before_the_root_was_recorded(trained, tmp_path, caplog):
    """No ``randlora_root`` in the file: the names as they are, where the model has them."""
    model, ckpt, x = trained
    old = tmp_path / "checkpoint-2"
    old.mkdir()
    (old / ADAPTER_FILE).write_bytes((ckpt / ADAPTER_FILE).read_bytes())
    save_file(load_file(str(ckpt / EXTRA_FILE)), str(old / EXTRA_FILE), metadata={"format": "pt"})
    assert (logits(randlora.load(Classifier(), old), x) - logits(model, x)).abs().max().item() <= TOL
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="randlora"):
        randlora.load(Classifier().encoder, old)
    assert "NOT loaded: 2 of the 2" in folder_records(caplog)[0]


def test_cli_merge_of_the_folder_is_the_trained_model(trained, tmp_path, capsys):
    model, ckpt, x = trained
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in Classifier().state_dict().items()}, str(base))
    out = tmp_path / "merged.safetensors"
    assert cli(["merge", "--base", str(base), "--adapter", str(ckpt), "--out", str(out)]) == 0
    assert "and 2 tensors trained beside it" in capsys.readouterr().out
    merged = Classifier()
    merged.load_state_dict(load_file(str(out)))
    assert (logits(merged, x) - logits(model, x)).abs().max().item() <= 1e-5
    # the encoder's own weight file has no place for the head: refused, nothing written
    enc = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in Classifier().encoder.state_dict().items()}, str(enc))
    assert cli(["merge", "--base", str(enc), "--adapter", str(ckpt), "--out", str(tmp_path / "m2.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "have no place among the floating-point tensors" in err and f"--adapter {ckpt / ADAPTER_FILE}" in err
    assert not (tmp_path / "m2.safetensors").exists()


def test_lora_export_of_the_folder_says_the_head_is_not_in_it(trained, tmp_path, caplog):
    """A LoRA folder holds the layers' factors only: exporting a checkpoint folder whose Trainer trained a head
    beside the adapter says so at WARNING, naming the file to load the head from; an adapter file alone does not."""
    from randlora.export import export_file

    _, ckpt, _ = trained
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in Classifier().state_dict().items()}, str(base))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="randlora"):
        export_file(ckpt, base, tmp_path / "lora")
    (msg,) = folder_records(caplog)
    assert "2 tensors trained beside it ('head.bias', 'head.weight')" in msg and str(ckpt / EXTRA_FILE) in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="randlora"):
        export_file(ckpt / ADAPTER_FILE, base, tmp_path / "lora2")
    assert not folder_records(caplog)
