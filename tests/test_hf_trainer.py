"""transformers Trainer integration: adapter-only checkpoints, exact resume, best adapter at the end."""

from __future__ import annotations

import sys
import subprocess
import warnings

import pytest
import torch

import randlora
from randlora.errors import CheckpointError

transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")

from randlora.hf import ADAPTER_FILE, trainer_class  # noqa: E402
from stop_at import StopAt  # noqa: E402

MAX_STEPS = 6
VOCAB = 64


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                   vocab_size=VOCAB, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    randlora.inject(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, dropout=0.1)
    return model


def data(n=24, seed=0):
    """Counting sequences from a random start: learnable in a few steps, so the loss falls."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(8)) % VOCAB
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def args(out, **kw):
    base = dict(output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=3e-2,
                save_strategy="steps", save_steps=2, logging_steps=1, use_cpu=True, report_to=[], seed=0,
                disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, warmup_steps=2)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def adapter_state(model):
    return {k: v.detach().clone() for k, v in randlora.state_dict(model, save_projection=False).items()
            if k != "randlora_fingerprint"}


def trainer(model, out, callbacks=None, **kw):
    Trainer = trainer_class()
    return Trainer(model=model, args=args(out, **kw), train_dataset=data(), eval_dataset=data(8, seed=1),
                   callbacks=callbacks)


def test_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path):
    # dropout 0.1: resuming must also restore the RNG streams, as Trainer does for its checkpoints
    straight = tiny_model()
    trainer(straight, tmp_path / "a").train()
    want = adapter_state(straight)

    ck = tmp_path / "b" / "checkpoint-4"
    first = tiny_model()
    trainer(first, tmp_path / "b", callbacks=[StopAt(4)]).train()
    files = {p.name for p in ck.iterdir()}
    assert ADAPTER_FILE in files and {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}
    assert (ck / ADAPTER_FILE).stat().st_size < 64 * 1024  # λ, γ and the fingerprint, no weights or bases
    at4 = adapter_state(first)
    assert not (tmp_path / "b" / "checkpoint-6").exists()

    resumed = tiny_model()  # a fresh model: λ = 0 until the checkpoint is loaded
    trainer(resumed, tmp_path / "b").train(resume_from_checkpoint=str(ck))
    got = adapter_state(resumed)
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), k
    assert any(not torch.allclose(got[k], at4[k], atol=1e-4) for k in got)  # it trained after resuming


def test_resume_true_picks_the_last_checkpoint_and_save_model_writes_the_adapter(tmp_path):
    first = tiny_model()
    trainer(first, tmp_path, callbacks=[StopAt(2)]).train()
    resumed = tiny_model()
    t = trainer(resumed, tmp_path)
    t.train(resume_from_checkpoint=True)
    assert t.state.global_step == MAX_STEPS
    t.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / ADAPTER_FILE).is_file()
    assert not (tmp_path / "final" / "model.safetensors").exists()
    plain = tiny_model()
    randlora.eject(plain)
    randlora.load(plain, tmp_path / "final" / ADAPTER_FILE)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    resumed.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, resumed(input_ids=ids).logits, atol=1e-6)


def test_best_adapter_is_loaded_at_the_end(tmp_path):
    model = tiny_model()
    # the "best" run is the one with the HIGHEST eval loss, so that it is an early checkpoint, not the last
    t = trainer(model, tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                metric_for_best_model="loss", greater_is_better=True)
    t.train()
    evals = [(h["eval_loss"], h["step"]) for h in t.state.log_history if "eval_loss" in h]
    assert len(evals) == MAX_STEPS // 2
    best_step = max(evals)[1]
    assert best_step != MAX_STEPS
    assert t.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    best, _ = randlora.checkpoint.read_file(tmp_path / f"checkpoint-{best_step}" / ADAPTER_FILE)
    last, _ = randlora.checkpoint.read_file(tmp_path / f"checkpoint-{MAX_STEPS}" / ADAPTER_FILE)
    got = adapter_state(model)
    for k in got:
        assert torch.equal(got[k], best[k]), k
    assert any(not torch.equal(got[k], last[k]) for k in got)


def test_resume_from_a_folder_without_the_adapter_is_refused(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    model = tiny_model()
    before = adapter_state(model)
    with pytest.raises(CheckpointError, match=ADAPTER_FILE):
        trainer(model, tmp_path / "o").train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    after = adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_trainer_class_checks_its_base_and_import_is_lazy():
    with pytest.raises(TypeError, match="transformers.Trainer"):
        trainer_class(dict)
    Sub = type("Sub", (transformers.Trainer,), {})
    assert issubclass(trainer_class(Sub), Sub) and trainer_class(Sub) is trainer_class(Sub)
    import randlora.hf

    assert randlora.hf.RandLoraTrainer is trainer_class()
    code = "import sys, randlora, randlora.hf; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_resume_from_a_folder_without_an_adapter_file_is_refused_and_loads_nothing(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in randlora.state_dict(model, save_projection=False).items()}
    (tmp_path / "empty" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "empty" / "checkpoint-2" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError) as e:
        trainer(model, tmp_path / "out", max_steps=2).train(resume_from_checkpoint=str(tmp_path / "empty" / "checkpoint-2"))
    msg = str(e.value)
    assert msg.startswith("cannot load the checkpoint: the folder") and f"holds no {ADAPTER_FILE}" in msg, msg
    assert "Nothing was loaded" in msg and len(msg) < 1500
    after = randlora.state_dict(model, save_projection=False)
    assert all(torch.equal(before[k], after[k]) for k in before)
