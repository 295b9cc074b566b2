"""Small models and helpers shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

from randlora.registry import DEFAULT
from randlora.walker import adapted_layers

TARGETS = ["q_proj", "up_proj", "down_proj"]


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down_proj(torch.tanh(self.up_proj(x + self.q_proj(x))))


class Net(nn.Module):
    """Residual blocks with a square (``q_proj``), a widening (``up_proj``) and a narrowing (``down_proj``) layer."""

    def __init__(self, d: int = 12, h: int = 20, n_layers: int = 2, out: int = 5) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(d, h) for _ in range(n_layers)])
        self.lm_head = nn.Linear(d, out)

    def forward(self, x):
        for blk in self.layers:
            x = blk(x)
        return self.lm_head(x)


def randomize(model: nn.Module, seed: int = 0, name: str = DEFAULT) -> None:
    """Random ``λ ~ N(0, 1)``, ``γ ~ N(0, 1/m²)`` for adapter ``name`` (so ΔW is full rank)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            ad = layer.adapter(name)
            if ad is not None:
                ad.randlora_lambda.copy_(torch.randn(ad.randlora_lambda.shape, generator=g))
                ad.randlora_gamma.copy_(torch.randn(ad.randlora_gamma.shape, generator=g) / layer.m)
