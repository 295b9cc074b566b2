"""Smallest end-to-end example: inject, train a few steps, save, reload, merge, and print what happened.

Run: python benchmarks/example.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

import randlora


class TinyMLP(nn.Module):
    def __init__(self, d: int = 64, h: int = 128, classes: int = 4) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d, h)
        self.down_proj = nn.Linear(h, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.down_proj(torch.relu(self.up_proj(x))))


def main() -> None:
    torch.manual_seed(0)
    model = TinyMLP()
    x = torch.randn(512, 64)
    y = (x[:, :4] @ torch.randn(4, 4)).argmax(-1)  # a task the frozen model does not solve
    report = randlora.inject(model, targets=["up_proj", "down_proj"], r=8)
    print(report)
    opt = torch.optim.AdamW(randlora.trainable_parameters(model), lr=1e-2)
    for step in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == 59:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        logits = model(x)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "adapter.safetensors"
        randlora.save(model, path, save_projection=False)
        print(f"saved adapter: {path.stat().st_size:,} bytes")
        fresh = TinyMLP()
        fresh.load_state_dict(model.state_dict(), strict=False)  # base weights only
        randlora.load(fresh, path)
        fresh.eval()
        with torch.no_grad():
            same = torch.equal(fresh(x), logits)
        print(f"reloaded adapter gives identical outputs: {same}")
    randlora.merge(model)
    with torch.no_grad():
        err = (model(x) - logits).abs().max().item()
    print(f"merged into plain nn.Linear layers: {type(model.up_proj).__name__}, max |difference| {err:.2e}")
    if not same or err > 1e-4:
        raise SystemExit("example checks failed")


if __name__ == "__main__":
    main()
