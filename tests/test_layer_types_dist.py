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


def test_fsdp2_two_processes_give_the_single_process_gradients(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    pytest.importorskip("torch.distributed.fsdp")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import torch.multiprocessing as mp

    mp.start_processes(fsdp_worker, args=(str(tmp_path),), nprocs=2, start_method="spawn")
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
