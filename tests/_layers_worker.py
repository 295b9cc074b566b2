"""A tiny model holding every non-linear layer type RandLora adapts besides expert tensors (a ``Conv2d``, a grouped
``Conv1d``, an ``nn.TransformerEncoderLayer`` with its attention's ``in_proj`` and ``out_proj``), and the two-process
FSDP2 worker for tests/test_layer_types_dist.py (a module of its own: spawn imports it in every worker, without
transformers)."""

from __future__ import annotations

import torch
from torch import nn

import randlora

from models import randomize

TARGETS = ["patch", "mix", "self_attn", "out_proj", "linear1", "linear2"]
X = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


class ConvViT(nn.Module):
    """A conv patch embedding (``Conv2d`` 3×3 then a grouped ``Conv1d`` over the 16 positions), one encoder layer,
    a mean-pooled head: ``(B, 2, 4, 4)`` images to ``(B, 3)`` logits. Given ``labels``, returns
    ``{"loss", "logits"}`` (cross-entropy), as transformers' Trainer expects."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(2, 8, 3, padding=1)
        self.mix = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, pixel_values, labels=None):
        tokens = self.mix(self.patch(pixel_values).flatten(2)).transpose(1, 2)  # (B, 16, 8)
        logits = self.head(self.enc(tokens).mean(1))
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def adapted_model(dtype=torch.float64, random: bool = True) -> nn.Module:
    """:class:`ConvViT` (seeded) with :data:`TARGETS` adapted (``r=2``), ``λ``/``γ`` random (seeded) if ``random``."""
    torch.manual_seed(0)
    model = ConvViT().to(dtype)
    randlora.inject(model, TARGETS, r=2, seed=3)
    if random:
        randomize(model, seed=1)
    return model


def _sharded_alone(mesh) -> list[tuple[str, bool]]:
    """For ``in_proj`` and ``out_proj`` each sharded on its own (inside the sharded encoder layer): the refusal's
    message, and whether the attention module still holds Parameters (no ``W + s·ΔW`` left swapped in) and the
    layers' switches are as before the call."""
    from torch.distributed.fsdp import fully_shard

    out = []
    for role in ("in_proj", "out_proj"):
        model = adapted_model()
        mha = model.enc.self_attn
        fully_shard(mha.get_submodule(role), mesh=mesh)
        fully_shard(model.enc, mesh=mesh)
        fully_shard(model, mesh=mesh)
        layers = (mha.in_proj, mha.out_proj)
        try:
            model(X)
            msg = "no refusal"
        except randlora.StateError as e:
            msg = str(e)
        kept = (all(isinstance(w, nn.Parameter) for w in (mha.in_proj_weight, mha.out_proj.weight))
                and all(not l.disabled and "_randlora_weight" not in l.__dict__ for l in layers))
        out.append((msg, kept))
    return out


def fsdp_worker(rank: int, tmp: str) -> None:
    """Shard :func:`adapted_model` (each conv, the encoder layer, the root; then also the attention module inside
    the encoder layer), run one backward on :data:`X`, save each run's gathered gradients and
    ``randlora.state_dict`` and whether the adapted convs' λ and the in_proj's λ were DTensors; then the
    refusals of an attention's ``in_proj`` / ``out_proj`` sharded alone (:func:`_sharded_alone`)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=2)
    mesh, out = init_device_mesh("cpu", (2,)), []
    for inner in (False, True):
        model = adapted_model()
        if inner:
            fully_shard(model.enc.self_attn, mesh=mesh)
        for blk in (model.patch, model.mix, model.enc):
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        lams = (model.patch.randlora_lambda, model.mix.randlora_lambda, model.enc.self_attn.in_proj.randlora_lambda)
        sharded = all(isinstance(t, DTensor) for t in lams)
        model(X).square().sum().backward()
        out.append(({n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None},
                    randlora.state_dict(model, save_projection=False), sharded))
    out.append(_sharded_alone(mesh))
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()
