"""Convolutions and the attention ``in_proj`` under FSDP2 (two CPU processes) and transformers' Trainer.

One tiny model (tests/_layers_worker.py) holds an adapted ``Conv2d``, a grouped ``Conv1d`` and an
``nn.TransformerEncoderLayer`` whose attention's ``in_proj`` and ``out_proj`` and both linear layers are adapted.
Sharded with ``fully_shard`` (per conv, the encoder layer and the root; then the attention module on its own as
well), every rank's gathered ``λ``/``γ`` gradients and ``randlora.state_dict`` equal a single-process run's;
an attention's ``in_proj`` or ``out_proj`` sharded on its own (the attention module reads it without calling it,
so FSDP2 would never gather it) is refused with a ``StateError``.
Under ``randlora.hf.trainer_class()`` the checkpoints hold the adapter alone and a run resumed from one ends
with the uninterrupted run's ``λ``/``γ``.
"""

from __future__ import annotations

import pytest
import torch

import randlora

from _layers_worker import X, adapted_model, fsdp_worker


def test_fsdp2_two_processes_give_the_single_process_gradients(tmp_path, spawn_two):
    spawn_two(fsdp_worker, str(tmp_path))
    ref = adapted_model()
    ref(X).square().sum().backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    sd = randlora.state_dict(ref, save_projection=False)
    assert len(grads) == 12 and all(g.abs().max() > 0 for g in grads.values())  # λ, γ of six adapted weights
    for rank in range(2):
        runs = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert len(runs) == 3
        for got, got_sd, sharded in runs[:2]:
            assert sharded and got.keys() == grads.keys()
            for k in grads:
                torch.testing.assert_close(got[k], grads[k], atol=1e-12, rtol=1e-10, msg=k)
            assert got_sd.keys() == sd.keys() and all(torch.equal(got_sd[k], sd[k]) for k in sd)
        for (msg, kept), role in zip(runs[2], ("in_proj", "out_proj")):  # sharded alone: never gathered
            assert msg.startswith(f"{role} of this nn.MultiheadAttention is sharded on its own") and kept
            assert "fully_shard the attention module or a module above it" in msg


def test_trainer_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")
    from randlora.hf import ADAPTER_FILE, trainer_class
    from stop_at import StopAt

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(12, 2, 4, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    data = [{"pixel_values": x, "labels": y} for x, y in zip(images, labels)]

    def run(out, resume=None, callbacks=None):
        model = adapted_model(torch.float32, random=False)
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=3, per_device_train_batch_size=4,
                                              learning_rate=3e-2, save_strategy="steps", save_steps=1, use_cpu=True,
                                              report_to=[], seed=0, disable_tqdm=True, remove_unused_columns=False)
        trainer_class()(model=model, args=args, train_dataset=data, callbacks=callbacks).train(
            resume_from_checkpoint=resume)
        return {k: t for k, t in randlora.state_dict(model, save_projection=False).items() if k.endswith(("lambda", "gamma"))}

    want = run(tmp_path / "a")
    run(tmp_path / "b", callbacks=[StopAt(2)])
    ck = tmp_path / "b" / "checkpoint-2"
    files = {p.name for p in ck.iterdir()}
    assert ADAPTER_FILE in files and {"optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"} and not (tmp_path / "b" / "checkpoint-3").exists()
    at2 = randlora.checkpoint.read_file(ck / ADAPTER_FILE)[0]
    for k in ("patch.randlora_lambda", "mix.randlora_gamma", "enc.self_attn.in_proj.randlora_lambda",
              "enc.self_attn.out_proj.randlora_gamma"):
        assert k in at2
    assert not any(k.endswith(("weight", "bias")) for k in at2)  # the adapter alone
    got = run(tmp_path / "b", resume=str(ck))
    assert got.keys() == want.keys() and len(want) == 12
    for k in want:
        assert torch.equal(got[k], want[k]), k
        assert not torch.equal(got[k], at2[k]), k  # every λ/γ trained after resuming
