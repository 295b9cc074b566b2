"""Training-step time and saved activations: RandLora on convolutions and attention in_proj against peft's LoRA.

Two small vision models, every weight the question names adapted:

- ``cnn``: a ResNet-like stack (a 3x3 stem, residual blocks of two 3x3 convolutions, a linear head); the
  convolutions are adapted (RandLoraConv; peft's conv LoRA);
- ``vit``: a ViT-style encoder (a patch-embedding convolution, ``nn.TransformerEncoder`` of
  ``nn.TransformerEncoderLayer``); adapted: the patch embedding, every attention module's ``in_proj_weight``
  and ``out_proj``, ``linear1`` and ``linear2`` (peft: the same layers, its ``nn.MultiheadAttention`` LoRA).

Methods: RandLora with dense bases, with ``bases="very_sparse"``, peft's LoRA (``--lora-r``) and full
fine-tuning. Every method is built once in this one process; each round times one step (forward, backward,
AdamW) of every method in an order rotated each round (``_common.interleaved``), so the ratios are measured side
by side. Memory: the bytes autograd saves for backward in one training forward (unique storages, counted by
``torch.autograd.graph.saved_tensors_hooks``), and the trainable count.

    python benchmarks/conv_step.py --threads 1     # batch 16, 32x32 images, width 64, 4 blocks, 7 rounds
    python benchmarks/conv_step.py --quick         # a tiny size, 2 rounds: checks the script runs

On a machine other processes load, pass ``--threads`` no larger than the idle cores: oversubscribed OpenMP
threads turned the tiny ``--quick`` steps from about 3 ms into 300 ms.

Needs peft (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, markdown_table, write_json  # noqa: E402

import randlora  # noqa: E402

KINDS = ("randlora", "randlora-vs", "peft-lora", "full")


class CNN(nn.Module):
    """A 3x3 stem, ``blocks`` residual blocks of two 3x3 convolutions, global pooling, a linear head."""

    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(width, width, 3, padding=1)) for _ in range(blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        for b in self.blocks:
            y = torch.relu(y + b(y))
        return self.head(y.mean((2, 3)))


class ViT(nn.Module):
    """A patch-embedding convolution, ``nn.TransformerEncoder`` (batch first), mean pooling, a linear head."""

    def __init__(self, width: int, blocks: int, patch: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, patch, stride=patch)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


MODELS = {  # model class, RandLora targets, peft target_modules (None: every convolution, by path)
    "cnn": (CNN, None, None),
    "vit": (ViT, ["patch", "self_attn", "out_proj", "linear1", "linear2"], ["patch", "self_attn", "linear1",
                                                                            "linear2"]),
}


def _convs(model: nn.Module) -> list[str]:
    """Every convolution of ``model``, by path."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def build(kind: str, name: str, pristine: nn.Module, r: int, lora_r: int) -> tuple[nn.Module, list]:
    """A copy of ``pristine`` adapted for ``kind`` and the parameters its optimiser steps."""
    model = copy.deepcopy(pristine)
    _, targets, peft_targets = MODELS[name]
    targets, peft_targets = targets or _convs(model), peft_targets or _convs(model)
    if kind.startswith("randlora"):
        randlora.inject(model, targets, r=r, bases="very_sparse" if kind == "randlora-vs" else "dense")
        return model, randlora.trainable_parameters(model)
    if kind == "peft-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=peft_targets))
    elif kind != "full":
        raise ValueError(kind)
    return model, [p for p in model.parameters() if p.requires_grad]


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the unique storages autograd saves for backward in one training forward of ``model``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).float().pow(2).mean()
    return sum(seen.values())


def measure(name: str, kinds: list[str], args) -> list[dict]:
    """One row per kind: median step seconds (interleaved), trainable count, saved activation bytes."""
    torch.manual_seed(0)
    pristine = MODELS[name][0](args.width, args.blocks)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    built = {}
    for k in kinds:
        model, params = build(k, name, pristine, args.r, args.lora_r)
        built[k] = (model.train(), torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params))

    def step(k: str) -> None:
        model, opt, _ = built[k]
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = interleaved(kinds, step, args.rounds)
    return [{"model": name, "kind": k, "seconds": statistics.median(times[k]), "times": times[k],
             "trainable": built[k][2], "saved_bytes": saved_bytes(built[k][0], x)} for k in kinds]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=32, help="image side (default 32)")
    ap.add_argument("--width", type=int, default=64, help="channels / embedding width (default 64)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--r", type=int, default=8, help="RandLora's r (default 8)")
    ap.add_argument("--lora-r", type=int, default=8, help="peft LoRA's r (default 8)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="batch 2, 8x8 images, width 16, 1 block, 2 rounds")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/out/conv_step.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.width, args.blocks, args.rounds = 2, 8, 16, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    record = [row for name in args.models for row in measure(name, args.kinds, args)]
    rows = []
    for row in record:
        ref = next((r for r in record if r["model"] == row["model"] and r["kind"] == "peft-lora"), None)
        ratio = (lambda key: f"{row[key] / ref[key]:.2f}") if ref else (lambda key: "-")
        rows.append([row["model"], row["kind"], f"{1e3 * row['seconds']:.1f}", ratio("seconds"),
                     f"{row['trainable']:,}", f"{row['saved_bytes'] / 2**20:.1f}", ratio("saved_bytes")])
    print(f"\nbatch {args.batch}, {args.size}x{args.size} images, width {args.width}, {args.blocks} blocks, RandLora "
          f"r={args.r}, peft LoRA r={args.lora_r}; median of {args.rounds} interleaved steps, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(markdown_table(["model", "method", "ms per step", "/ peft LoRA", "trainable", "saved MiB", "/ peft LoRA"],
                         rows))
    path = write_json("conv_step.json", {"args": vars(args), "runs": record}, args.out)
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
