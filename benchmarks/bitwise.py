"""Bit-for-bit check of a refactor: losses, gradients and outputs on the benchmark Llama's shapes.

Snapshot at one commit, compare at another (same machine, same thread count):

    git checkout OLD && python benchmarks/bitwise.py /tmp/before.pt
    git checkout NEW && python benchmarks/bitwise.py /tmp/after.pt --compare /tmp/before.pt

The model: ``LlamaConfig`` hidden 1024, MLP 2816, 2 layers, every linear layer adapted with two adapters (r = 32,
random λ, γ), 4 × 256 tokens; dense and ``very_sparse`` bases. Recorded: the training loss and every gradient
under ``keep`` auto / always / never, eval logits, ``randlora.cached`` and ``cached(frozen_base=True)`` logits,
``randlora.mixed`` with and without ``keep_bytes`` (two name orders; 256, 3 and 1 tokens per row), and a mixed
training loss with its gradients. ``--compare`` prints how many tensors differ (and the largest differences).
"""
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import randlora


def adapted_llama(bases: str) -> torch.nn.Module:
    """The benchmark Llama's layer shapes, two adapters on every linear layer, λ/γ random (seeded)."""
    conf = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=4096, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(conf)
    randlora.inject(model, "all-linear", r=32, bases=bases)
    randlora.inject(model, "all-linear", r=32, bases=bases, name="b")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "randlora" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def grads(model: torch.nn.Module, prefix: str, out: dict) -> None:
    for n, p in model.named_parameters():
        if p.grad is not None:
            out[f"{prefix}/grad/{n}"] = p.grad.clone()


def training(model: torch.nn.Module, ids: torch.Tensor, bases: str, out: dict) -> None:
    for keep in ("auto", "always", "never"):
        with randlora.force_route(model, keep=keep) if hasattr(randlora, "force_route") else _keep(model, keep):
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        out[f"{bases}/{keep}/loss"] = loss.detach()
        grads(model, f"{bases}/{keep}", out)


class _keep:
    """``keep`` on every layer for a block, on versions without ``randlora.force_route``."""

    def __init__(self, model, keep):
        self.layers, self.keep = [m for m in model.modules() if hasattr(m, "set_keep")], keep

    def __enter__(self):
        for m in self.layers:
            m.set_keep(self.keep)

    def __exit__(self, *exc):
        for m in self.layers:
            m.set_keep("auto")


def serving(model: torch.nn.Module, ids: torch.Tensor, bases: str, out: dict) -> None:
    model.eval()
    with torch.no_grad():
        out[f"{bases}/eval"] = model(input_ids=ids).logits
        with randlora.cached(model):
            out[f"{bases}/cached"] = model(input_ids=ids).logits
            out[f"{bases}/cached2"] = model(input_ids=ids[:, :8]).logits
        with randlora.cached(model, frozen_base=True):
            out[f"{bases}/frozen"] = model(input_ids=ids).logits
            out[f"{bases}/frozen1"] = model(input_ids=ids[:, :1]).logits
            out[f"{bases}/frozen1b"] = model(input_ids=ids[:, :1]).logits
        for keep_bytes in (0, 1 << 30):
            for names in (["default", "b", None, "b"], ["b", "b", "default", "default"]):
                with randlora.mixed(model, names, keep_bytes=keep_bytes):
                    for label, t in (("long", 256), ("short", 3), ("one", 1)):
                        out[f"{bases}/mixed/{keep_bytes}/{names}/{label}"] = model(input_ids=ids[:, :t]).logits
    model.train()
    model.zero_grad(set_to_none=True)
    with randlora.mixed(model, ["default", "b", None, "b"]):
        loss = model(input_ids=ids[:, :64], labels=ids[:, :64]).loss
        loss.backward()
    out[f"{bases}/mixedtrain/loss"] = loss.detach()
    grads(model, f"{bases}/mixedtrain", out)


def snapshot() -> dict:
    out: dict = {}
    ids = torch.randint(0, 4096, (4, 256), generator=torch.Generator().manual_seed(2))
    for bases in ("dense", "very_sparse"):
        model = adapted_llama(bases)
        training(model, ids, bases, out)
        serving(model, ids, bases, out)
    return out


def main(argv: list[str]) -> int:
    torch.set_num_threads(2)
    out = snapshot()
    torch.save(out, argv[0])
    if len(argv) < 3 or argv[1] != "--compare":
        print(f"saved {len(out)} tensors to {argv[0]}")
        return 0
    base = torch.load(argv[2])
    bad = [k for k in base if k not in out or not torch.equal(base[k], out[k])]
    print(f"{len(base)} tensors compared; {len(bad)} differ; {len([k for k in out if k not in base])} new")
    for k in bad[:20]:
        same_shape = k in out and base[k].shape == out[k].shape
        print("DIFF", k, (base[k] - out[k]).abs().max().item() if same_shape else "shape or missing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
