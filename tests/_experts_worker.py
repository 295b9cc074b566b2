"""Two-process FSDP2 workers for tests/test_experts.py (a module of its own: spawn imports it in every worker,
without the transformers models the test module builds)."""

from __future__ import annotations

import torch
from torch import nn

import randlora


class Experts(nn.Module):
    """A module computing with one 3-D parameter, as transformers' fused experts do."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 12, 8, generator=torch.Generator().manual_seed(0)) * 0.3)

    def forward(self, x):
        return torch.tanh(torch.bmm(x, self.w.transpose(1, 2)))[..., :8].contiguous()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts, self.lin = Experts(), nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(self.experts(x))


X = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(2))


def fsdp_model() -> nn.Module:
    """Two blocks, their expert tensors and linear layers adapted, λ and γ random (seeded)."""
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    randlora.inject(model, ["lin"], target_parameters=["w"], r=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "randlora" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def fsdp_worker(rank: int, tmp: str) -> None:
    """Shard :func:`fsdp_model` (the experts' module with its block, then on its own), run one backward, save
    each run's gathered gradients, ``randlora.state_dict`` and the type of an expert tensor's λ."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=2)
    mesh, out = init_device_mesh("cpu", (2,)), []
    for inner in (False, True):
        model = fsdp_model()
        for blk in model:
            if inner:
                fully_shard(blk.experts, mesh=mesh)
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model(X).square().sum().backward()
        out.append(({n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None},
                    randlora.state_dict(model, save_projection=False),
                    type(model[0].experts.randlora_params.w.randlora_lambda).__name__))
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()
