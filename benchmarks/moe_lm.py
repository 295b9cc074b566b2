"""A generative learning-quality task on a mixture-of-experts model: adapt the attention only, or the attention and
the fused expert tensors, with RandLora and with peft LoRA at equal trainable counts.

The setting of ``benchmarks/lm_task.py`` (its corpora, byte vocabulary, windows, training loop, schedule and
perplexity are imported from it), with a ``transformers.MixtralForCausalLM`` in place of its Llama: hidden 128,
4 layers, 4 heads, 4 experts of intermediate 128 per layer, top-2 routing, untied embeddings; 1.12 M parameters,
of which the expert tensors hold 786 K (75 % of those outside the embeddings). Pretrained on corpus A (English
prose; lm_task's pretraining cut to 2,500 steps) and shipped in
``benchmarks/tiny_moe_lm/`` (``config.json``, ``model.safetensors``, ``pretrain.json``); ``grouped_mm`` computes
the experts (the fastest on one CPU thread; pretrain.json records its largest difference from ``eager``).

Commands:

    python benchmarks/moe_lm.py pretrain          # about 10 min on one thread; writes benchmarks/tiny_moe_lm/
    python benchmarks/moe_lm.py study             # 3 seeds at lr 3e-3, about 22 min on one thread
    python benchmarks/moe_lm.py study --lrs 3e-3,1e-3   # and at 1e-3 (the 3e-3 runs come from the cache)
    python benchmarks/moe_lm.py study --quick     # smoke run (a few seconds), used by tests/test_moe_lm.py

The study adapts the shipped model to corpus B (Python source) with:

- ``randlora-attn``: ``randlora.inject(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=32, seed=seed)``;
- ``randlora-experts``: the same plus ``target_parameters=["gate_up_proj", "down_proj"]`` (every expert its own
  ``λ``, ``γ`` over the shared bases);
- ``lora-attn`` / ``lora-experts``: peft LoRA on the same modules (``target_modules``) and tensors
  (``target_parameters``), per-target ranks (``rank_pattern``, alpha = 2·rank) whose trainable count is closest to
  its RandLora twin's;
- ``frozen``: the pretrained model.

AdamW (no weight decay), ``lm_task``'s warmup (10 % of the steps) and linear decay, the same batches for every
method on a seed. Metric: per-byte perplexity of B's held-out files, mean ± std over seeds, and two paired
differences of log-perplexity (nats per byte) by seed: RandLora − LoRA at the same scope, and attention+experts −
attention-only within a method. Every run is cached in ``--out``/moe_lm_runs (resumable); the summary goes to
``--out``/moe_lm_study.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_task as lm  # noqa: E402  (sets the offline environment variables before transformers loads)
from _common import OUT_DIR, machine, markdown_table, median, write_json  # noqa: E402

import randlora  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "tiny_moe_lm"
IMPL = "grouped_mm"  # experts_implementation: the fastest of eager / batched_mm / grouped_mm on one CPU thread
MODEL_SIZES = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)
PRETRAIN = dict(lm.PRETRAIN, steps=2500)  # lm_task's (16 windows, 3e-3, warmup 100), 2,500 steps: ~10 min
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["gate_up_proj", "down_proj"]
LABELS = {"randlora-attn": "RandLora, attention", "lora-attn": "LoRA (peft), attention",
          "randlora-experts": "RandLora, attention + experts", "lora-experts": "LoRA (peft), attention + experts",
          "frozen": "frozen (no training)"}
ORDER = tuple(LABELS)
TWIN = {"lora-attn": "randlora-attn", "lora-experts": "randlora-experts"}  # LoRA matched to this RandLora count


# ------------------------------------------------------------------------------------------------
# the model and its pretraining
# ------------------------------------------------------------------------------------------------
def new_model(seed: int) -> nn.Module:
    """A randomly initialised byte-level Mixtral (``MODEL_SIZES``, lm_task's vocabulary and special ids)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=lm.VOCAB, bos_token_id=lm.BOS, eos_token_id=lm.EOS, pad_token_id=lm.PAD,
                        tie_word_embeddings=False, **MODEL_SIZES)
    model = MixtralForCausalLM(cfg)
    model.config._experts_implementation = IMPL
    return model


def load_model(folder: Path = MODEL_DIR) -> nn.Module:
    """The shipped pretrained model (float32, eval mode, experts computed by ``IMPL``)."""
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    model.config._experts_implementation = IMPL
    return model


@torch.no_grad()
def impl_gap(model: nn.Module, x: torch.Tensor, other: str = "eager") -> float:
    """Largest absolute difference of the logits on ``x`` between ``IMPL`` and ``other``."""
    model.eval()
    outs = []
    for impl in (IMPL, other):
        model.config._experts_implementation = impl
        outs.append(model(input_ids=x).logits)
    model.config._experts_implementation = IMPL
    return (outs[0] - outs[1]).abs().max().item()


def pretrain(args) -> int:
    """Pretrain on corpus A (``PRETRAIN`` settings, or ``--steps``), save to ``--model-dir``."""
    cfg = dict(PRETRAIN, steps=args.steps or PRETRAIN["steps"])
    train, held = lm.corpus_a()
    s_train, s_held = lm.to_stream(train), lm.to_stream(held)
    model = new_model(cfg["seed"])
    starts = lm.batch_starts(len(s_train), cfg["steps"], cfg["batch"], cfg["seed"] + 1000)
    t0 = time.perf_counter()
    losses = lm.train_loop(model, list(model.parameters()), s_train, starts, cfg["lr"], cfg["warmup"])
    seconds = time.perf_counter() - t0
    ppl = lm.perplexity(model, s_held)
    gap = impl_gap(model, lm.windows(s_held, torch.arange(0, 8 * lm.SEQ, lm.SEQ))[:, :-1])
    folder = Path(args.model_dir)
    model.save_pretrained(folder, safe_serialization=True)
    experts = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in EXPERTS)
    info = {"corpus": "corpus A of benchmarks/lm_task.py (pydoc_data.topics + builtin docstrings)",
            "train_bytes": len(s_train), "heldout_bytes": len(s_held),
            "settings": dict(cfg, seq=lm.SEQ, optimizer="AdamW, weight decay 0", schedule="linear warmup/decay"),
            "parameters": sum(p.numel() for p in model.parameters()), "expert_parameters": experts,
            "experts_implementation": IMPL, "max_logit_gap_vs_eager": gap,
            "final_train_loss": statistics.fmean(losses[-50:]), "heldout_ppl": ppl, "seconds": seconds,
            "machine": machine()}
    (folder / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "machine"}, indent=2))
    return 0


# ------------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------------
def rank_one_counts(model: nn.Module, experts: bool) -> dict[str, int]:
    """peft LoRA's trainable count at rank 1 per target: ``O + I`` per linear layer, ``E·(a + b)`` per expert
    tensor ``(E, a, b)`` (peft gives every expert its own rank-``r`` pair)."""
    per = {t: sum(m.in_features + m.out_features for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and n.endswith("." + t)) for t in ATTN}
    for t in EXPERTS if experts else []:
        per[t] = sum(p.shape[0] * (p.shape[1] + p.shape[2]) for n, p in model.named_parameters()
                     if n.endswith("." + t))
    return per


def randlora_adapt(model: nn.Module, experts: bool, r: int, seed: int) -> list:
    """RandLora on the attention projections (and the expert tensors); its trainable parameters."""
    extra = {"target_parameters": EXPERTS} if experts else {}
    report = randlora.inject(model, ATTN, r=r, seed=seed, **extra)
    if len(report.experts) != (len(EXPERTS) * model.config.num_hidden_layers if experts else 0):
        raise RuntimeError(f"unexpected expert tensors adapted: {sorted(report.experts)}")
    return randlora.trainable_parameters(model)


class Context:
    """The pristine model, corpus B's streams, RandLora's counts and LoRA's matched ranks, loaded once."""

    def __init__(self, model_dir: Path, quick: bool, r: int) -> None:
        self.pristine = load_model(model_dir)
        self.model_hash = lm.file_hash(model_dir / "model.safetensors")
        train, held = lm.corpus_b()
        self.train, self.held = lm.to_stream(train), lm.to_stream(held)
        self.eval_windows = 4 if quick else None
        self.counts, self.ranks = {}, {}
        for lora, twin in TWIN.items():
            experts = twin.endswith("experts")
            params = randlora_adapt(copy.deepcopy(self.pristine), experts, r, 0)
            self.counts[twin] = sum(p.numel() for p in params)
            self.ranks[lora] = lm.closest_ranks(rank_one_counts(self.pristine, experts), self.counts[twin])


def build(spec: dict, ctx: Context) -> tuple[nn.Module, list, str]:
    """A fresh copy of the pretrained model set up for ``spec``: (model, parameters to train, note)."""
    model, method, seed = copy.deepcopy(ctx.pristine), spec["method"], spec["seed"]
    torch.manual_seed(seed)  # LoRA's A initialisation
    if method == "frozen":
        return model, [], "no training"
    experts = method.endswith("experts")
    if method.startswith("randlora"):
        params = randlora_adapt(model, experts, spec["r"], seed)  # the bases drawn per seed, like LoRA's A
        return model, params, f"r={spec['r']}, alpha=r, init sqrt, dense, bases seed {seed}"
    from peft import LoraConfig, get_peft_model

    ranks = ctx.ranks[method]
    r0 = ranks[ATTN[0]]
    pattern = {t: k for t, k in ranks.items() if k != r0}
    cfg = LoraConfig(r=r0, lora_alpha=2 * r0, target_modules=ATTN, target_parameters=EXPERTS if experts else None,
                     lora_dropout=0.0, rank_pattern=pattern, alpha_pattern={t: 2 * k for t, k in pattern.items()})
    model = get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, "ranks " + ", ".join(f"{t}={k}" for t, k in ranks.items()) + ", alpha=2·rank"


def train_run(spec: dict, ctx: Context) -> dict:
    """Train one configuration on B's training files; held-out perplexity on B's other files."""
    model, params, note = build(spec, ctx)
    starts = lm.batch_starts(len(ctx.train), spec["steps"] if params else 0, spec["batch"], spec["seed"])
    t0 = time.perf_counter()
    losses = lm.train_loop(model, params, ctx.train, starts, spec["lr"], max(1, spec["steps"] // 10)) if params else []
    seconds = time.perf_counter() - t0
    ppl = lm.perplexity(model, ctx.held, ctx.eval_windows)
    tail = losses[-max(1, len(losses) // 10):]
    return {"spec": spec, "note": note, "trainable": sum(p.numel() for p in params), "heldout_ppl": ppl,
            "heldout_nll": math.log(ppl), "final_train_loss": statistics.fmean(tail) if tail else None,
            "losses": [round(x, 5) for x in losses], "seconds": seconds,
            "finite": all(math.isfinite(x) for x in losses + [ppl])}


def study_specs(args, ctx: Context) -> list[tuple[str, float, list[dict]]]:
    """``(method, lr, [spec per seed])`` for every row of the table."""
    rows = []
    for method in args.methods:
        for lr in [0.0] if method == "frozen" else args.lrs:
            seeds = [0] if method == "frozen" else list(range(args.seeds))
            specs = [{"task": "moe-lm-code", "method": method, "lr": lr, "seed": s,
                      "steps": 0 if method == "frozen" else args.steps, "batch": args.batch,
                      "r": None if method == "frozen" else args.r, "model": ctx.model_hash,
                      "eval_windows": ctx.eval_windows} for s in seeds]
            rows.append((method, lr, specs))
    return rows


def run_study(args, ctx: Context, folder: Path) -> dict[str, dict]:
    """Every pending run of this task (:func:`lm_task.run_cached`)."""
    return lm.run_cached(study_specs(args, ctx), args.seeds, folder, lambda spec: train_run(spec, ctx))


def paired(row: dict, ref: dict | None) -> list[float]:
    """``row``'s held-out log-perplexity minus ``ref``'s, seed by seed (the seeds both have)."""
    if ref is None:
        return []
    theirs = dict(zip(ref["seeds"], ref["nll"]))
    return [a - theirs[s] for s, a in zip(row["seeds"], row["nll"]) if s in theirs]


def summarize(args, ctx: Context, recs: dict[str, dict]) -> list[dict]:
    """One row per (method, lr) with its per-seed figures, and the paired differences in nats per byte: RandLora
    minus LoRA at the same scope, attention + experts minus attention only within a method."""
    rows = []
    for method, lr, specs in study_specs(args, ctx):
        done = [recs[lm.run_key(s)] for s in specs if lm.run_key(s) in recs]
        rows.append({"method": method, "label": LABELS[method], "lr": lr, "note": done[0]["note"] if done else "",
                     "seeds": [r["spec"]["seed"] for r in done], "trainable": done[0]["trainable"] if done else None,
                     "ppl": [r["heldout_ppl"] for r in done], "nll": [r["heldout_nll"] for r in done],
                     "train_loss": [r["final_train_loss"] for r in done if r["final_train_loss"] is not None],
                     "seconds": [r["seconds"] for r in done], "finite": all(r["finite"] for r in done)})
    by = {(r["method"], r["lr"]): r for r in rows}
    for row in rows:
        m, lr = row["method"], row["lr"]
        if m.startswith("randlora"):
            row["minus_lora_nll"] = paired(row, by.get((m.replace("randlora", "lora"), lr)))
        if m.endswith("experts"):
            row["minus_attn_nll"] = paired(row, by.get((m.replace("experts", "attn"), lr)))
    return rows


def deltas(xs: list[float] | None) -> str:
    if not xs:
        return ""
    return " / ".join(f"{x:+.4f}" for x in xs) + (f" (mean {statistics.fmean(xs):+.4f})" if len(xs) > 1 else "")


def table(rows: list[dict]) -> str:
    headers = ["method", "trainable", "lr", "seeds", "held-out ppl (mean ± std)", "RandLora − LoRA, Δ nats/byte",
               "+ experts − attention only, Δ nats/byte", "final train loss", "s / run"]
    out = [[row["label"], f"{row['trainable']:,}" if row["trainable"] is not None else "—",
            f"{row['lr']:g}" if row["lr"] else "—", len(row["seeds"]), lm.mean_std(row["ppl"]),
            deltas(row.get("minus_lora_nll")), deltas(row.get("minus_attn_nll")), lm.mean_std(row["train_loss"]),
            f"{median(row['seconds']):.0f}" if row["train_loss"] else "—"] for row in rows]
    return markdown_table(headers, out)


def study(args) -> int:
    """Run (or resume) the study, then write moe_lm_study.json / .md under ``--out`` and print the table."""
    ctx = Context(Path(args.model_dir), args.quick, args.r)
    out = Path(args.out)
    rows = summarize(args, ctx, run_study(args, ctx, out / "moe_lm_runs"))
    ranks = "; ".join(f"{m}: " + ", ".join(f"{t}={k}" for t, k in r.items()) for m, r in ctx.ranks.items())
    head = (f"Corpus B ({len(ctx.train):,} training bytes, {len(ctx.held):,} held-out). {args.steps} steps × "
            f"{args.batch} windows of {lm.SEQ} bytes. RandLora r={args.r}: "
            + ", ".join(f"{m} {n:,}" for m, n in ctx.counts.items()) + f" trainable; LoRA ranks {ranks}.")
    write_json("moe_lm_study.json", {"settings": vars(args), "header": head, "rows": rows, "machine": machine()},
               str(out / "moe_lm_study.json"))
    md = table(rows)
    (out / "moe_lm_study.md").write_text(head + "\n\n" + md + "\n")
    print(head + "\n\n" + md)
    return 0 if all(r["finite"] for r in rows) else 1


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p, _ = lm.command_line(__doc__, PRETRAIN["steps"], MODEL_DIR, OUT_DIR, ORDER, "3e-3")
    args = p.parse_args(argv)
    if args.command == "study":
        args.lrs, args.methods = [float(x) for x in args.lrs.split(",") if x], args.methods.split(",")
        if args.quick:
            args.seeds, args.steps, args.batch, args.lrs = 1, 4, 4, args.lrs[:1]
    return args


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    args = parse(argv)
    return pretrain(args) if args.command == "pretrain" else study(args)


if __name__ == "__main__":
    sys.exit(main())
