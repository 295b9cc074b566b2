"""Decode latency with one unmerged adapter: what each generated token costs against the base model.

Model: the benchmark Llama of benchmarks/step.py (hidden 1024, MLP 2816, 4 layers; random weights), every linear
layer adapted (r = 32; λ, γ random so the adapter changes the output), batch 1, greedy ``generate()`` with its KV
cache. Variants, each its own copy of the model, timed interleaved (every variant one generation per round, the
order rotated each round; a cached variant's block is entered once around all its generations, as a serving
loop would, so its one build per layer falls in the warm-up round) and reported as the median milliseconds
per new token:

* ``base``: the frozen model;
* ``randlora``, ``randlora-vs``: unmerged, dense or ``very_sparse`` bases (the planner's no-grad route);
* ``randlora-cached``, ``randlora-vs-cached``: the same inside ``randlora.cached(model, frozen_base=True)``
  (one kept ``W + s·ΔW`` per layer, one matmul per call); ``randlora-delta-cached``: inside
  ``randlora.cached(model)`` (``s·ΔW`` kept, ``W + s·ΔW`` formed on every call);
* ``merged``: ``randlora.merge`` (the base model's cost by construction);
* ``peft-lora``: peft LoRA r = 32 on the same layers, unmerged; ``peft-randlora``: peft's RandLora r = 32;
* with ``--variants``: ``base-nf4``, ``randlora-nf4``, ``randlora-nf4-cached``: every linear layer but the head a
  bitsandbytes NF4 layer (float32 compute), unmerged, and inside ``randlora.cached(model, frozen_base=True)``
  (each layer keeps its ``s·ΔW``: its quantised matmul plus one dense matmul per call); ratios against
  ``base-nf4``.

Every variant of this library is checked to generate the same tokens as the unmerged model with its bases.

    python benchmarks/decode.py                     # the table of docs/serving.md
    python benchmarks/decode.py --quick             # a tiny Llama, seconds (the test suite's smoke run)

Needs ``pip install -e ".[bench]"`` (transformers; peft for its two rows).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import have, interleaved, markdown_table, write_json  # noqa: E402
from serving import LLAMA, TINY, build_llama  # noqa: E402

import randlora  # noqa: E402
from randlora.walker import adapted_layers  # noqa: E402

VARIANTS = ("base", "randlora", "randlora-vs", "randlora-cached", "randlora-vs-cached", "randlora-delta-cached",
            "merged", "peft-lora", "peft-randlora")
NF4_VARIANTS = ("base-nf4", "randlora-nf4", "randlora-nf4-cached")  # bitsandbytes 4-bit bases (with --variants)


def nf4(base: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``base`` with every linear layer but the head a bitsandbytes NF4 ``Linear4bit`` (float32 compute)."""
    import bitsandbytes as bnb

    model = copy.deepcopy(base)
    for name, mod in list(model.named_modules()):
        if type(mod) is torch.nn.Linear and name != "lm_head":
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.load_state_dict(mod.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu").eval())  # quantised on the move
    return model


def adapted(base: torch.nn.Module, bases: str, r: int) -> torch.nn.Module:
    """A copy of ``base`` with every linear layer but the head adapted, λ and γ random (seeded)."""
    model = copy.deepcopy(base)
    randlora.inject(model, "all-linear", r=r, bases=bases)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.randlora_lambda.copy_(torch.randn(layer.randlora_lambda.shape, generator=g))
            layer.randlora_gamma.copy_(torch.randn(layer.randlora_gamma.shape, generator=g) / layer.m)
    return model


def build(variant: str, base: torch.nn.Module, r: int) -> tuple[torch.nn.Module, Callable[[], Any]]:
    """The model a variant generates with, and a function returning the context each generation runs in."""
    if variant == "base":
        return base, contextlib.nullcontext
    if variant.endswith("nf4") or "-nf4-" in variant:
        quantized = nf4(base)
        if variant == "base-nf4":
            return quantized, contextlib.nullcontext
        model = adapted(quantized, "dense", r)
        return model, (lambda: randlora.cached(model, frozen_base=True)) if variant.endswith("cached") else \
            contextlib.nullcontext
    if variant.startswith("randlora") or variant == "merged":
        model = adapted(base, "very_sparse" if "-vs" in variant else "dense", r)
        if variant == "merged":
            randlora.merge(model)
        if not variant.endswith("cached"):
            return model, contextlib.nullcontext
        return model, lambda: randlora.cached(model, frozen_base="delta" not in variant)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if variant == "peft-lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    else:
        from peft import RandLoraConfig, get_peft_model

        cfg = RandLoraConfig(r=r, target_modules=targets, randlora_alpha=20 * r, init_weights=False)
    return get_peft_model(copy.deepcopy(base), cfg).eval(), contextlib.nullcontext


def generate(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


def measure(variants: list[str], base: torch.nn.Module, r: int, new: int, rounds: int,
            prompt_len: int = 8) -> tuple[dict[str, list[float]], dict[str, bool]]:
    """Milliseconds per new token of each variant (``rounds`` generations each, interleaved), and whether each
    RandLora variant generated the unmerged model's tokens."""
    prompt = torch.randint(5, base.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    models = {v: build(v, base, r) for v in variants}
    same = {}
    for v, (model, ctx) in models.items():  # against the unmerged model with the same bases
        if v.startswith("randlora") or v == "merged":
            ref = "randlora-vs" if "-vs" in v else "randlora-nf4" if "-nf4" in v else "randlora"
            if ref not in models:
                continue
            want = generate(models[ref][0], prompt, new)
            with ctx():
                same[v] = torch.equal(generate(model, prompt, new), want)
    with contextlib.ExitStack() as stack:  # each variant's context entered once, as a serving loop would
        for model, ctx in models.values():
            stack.enter_context(ctx())
        # one warm-up round (the cached variants build their kept tensors there)
        times = interleaved(variants, lambda v: generate(models[v][0], prompt, new), rounds, warmup=1)
    return {v: [1e3 * t / new for t in ts] for v, ts in times.items()}, same


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny Llama, 8 tokens, 2 rounds: a smoke run")
    ap.add_argument("--new", type=int, default=None, help="new tokens per generation (default 64; quick 8)")
    ap.add_argument("--rounds", type=int, default=None, help="generations per variant (default 5; quick 2)")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", nargs="*", default=None, choices=VARIANTS + NF4_VARIANTS)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/out/decode[-quick].json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants or [v for v in VARIANTS if not (v.startswith("peft") and have("peft"))]
    size = TINY if args.quick else LLAMA
    new, rounds = args.new or (8 if args.quick else 64), args.rounds or (2 if args.quick else 5)
    r = 4 if args.quick else args.r
    times, same = measure(variants, build_llama(size), r, new, rounds)
    med = {v: statistics.median(t) for v, t in times.items()}
    def ratio(v: str) -> str:  # against the base model with the same (float or NF4) frozen layers
        ref = med.get("base-nf4" if "nf4" in v else "base")
        return f"{med[v] / ref:.2f}" if ref else "-"

    rows = [[v, f"{med[v]:.2f}", ratio(v), {True: "yes", False: "NO"}.get(same.get(v), "-")] for v in variants]
    print(f"\nLlama {size['hidden']}/{size['mlp']}, {size['layers']} layers, every linear layer, r = {r}; batch 1, "
          f"{new} new tokens greedy, median of {rounds} interleaved generations, {torch.get_num_threads()} threads\n")
    print(markdown_table(["variant", "ms per token", "/ base", "same tokens as unmerged"], rows))
    path = write_json("decode-quick.json" if args.quick else "decode.json",
                      {"size": size, "r": r, "new": new, "rounds": rounds, "times": times, "same": same}, args.out)
    print(f"\nwritten {path}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
