"""A generative learning-quality task: adapt a tiny byte-level causal LM from English prose to Python code.

The two other tasks of ``benchmarks/quality.py`` adapt an encoder (classification, retrieval). This one is
next-token prediction with a decoder, the setting most adapters are used in, small enough for one CPU thread.

Model: ``transformers.LlamaForCausalLM`` over bytes (ids 0-255, then BOS 256, EOS 257, PAD 258, one spare;
vocabulary 260), hidden 128, 4 layers, 4 heads, MLP 352, trained on windows of ``SEQ`` = 128 bytes; about
0.9 M parameters, shipped in ``benchmarks/tiny_lm/`` (``config.json``, ``model.safetensors``,
``pretrain.json``).

Corpora, both read from the running CPython (3.11 here; another version gives other texts, so other
numbers), one EOS after each document:

- A (pretraining, English prose): ``pydoc_data.topics.topics`` (the interpreter's ``help()`` topics) in
  sorted key order, every 8th topic (index % 8 == 7) held out; plus, for training only, ``inspect.getdoc``
  of every public member of the C modules ``CORPUS_A_DOC_MODULES`` (no Python source, so no overlap with B).
- B (adaptation, Python source): the files ``CORPUS_B_TRAIN`` of the standard library for training and the
  different files ``CORPUS_B_HELDOUT`` for the held-out perplexity (never seen in training).

Commands:

    python benchmarks/lm_task.py pretrain          # about 10 min on one thread; writes benchmarks/tiny_lm/
    python benchmarks/lm_task.py study             # 3 seeds at lr 3e-3, 1e-3; full FT at 3e-4, 1e-4; frozen
    python benchmarks/lm_task.py study --quick     # smoke run (< 40 s), used by tests/test_lm_task.py

The study adapts the shipped model to B's training files with: peft LoRA on every linear layer of the
blocks (q, k, v, o, gate, up, down) at per-target ranks whose trainable count is closest to RandLora's;
RandLora ``randlora.inject(model, "all-linear", r=32, seed=seed)`` (the library's defaults otherwise: init
"sqrt", alpha = r, dense bases; r = 32 is full rank on the 128-wide layers: n = 4 bases); full fine-tuning
at its own rates (``--full-lrs``); RandLora again with AdamW weight decay 3 on λ/γ (``randlora-wd3``, the
setting docs/usage.md recommends); and the frozen model. AdamW (no weight decay unless the row says so), linear
warmup (10 % of the
steps) then linear decay, the same batches for every method on a given seed. Metric: perplexity per byte
of B's held-out files (lower is better), mean ± std over seeds, and RandLora minus LoRA in log-perplexity
(= mean NLL per byte, in nats) paired by seed. Every run is cached as JSON in ``--out``/lm_runs, keyed by
its settings, so a stopped study resumes; the summary goes to ``--out``/lm_study.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import math
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT_DIR, machine, markdown_table, median, write_json  # noqa: E402

import randlora  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "tiny_lm"
BOS, EOS, PAD, VOCAB = 256, 257, 258, 260
SEQ = 128  # bytes per training / evaluation window (the model's positions go to 256)
MODEL_SIZES = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=352, max_position_embeddings=256)
CORPUS_A_DOC_MODULES = ("builtins", "cmath", "itertools", "math", "sys", "time")
CORPUS_B_TRAIN = ("calendar.py", "contextlib.py", "csv.py", "dataclasses.py", "fractions.py", "functools.py",
                  "glob.py", "heapq.py", "queue.py", "sched.py", "shlex.py", "string.py")
CORPUS_B_HELDOUT = ("bisect.py", "fnmatch.py", "getopt.py", "graphlib.py", "pprint.py", "secrets.py",
                    "textwrap.py")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRETRAIN = dict(steps=3000, batch=16, lr=3e-3, seed=0, warmup=100)


# ------------------------------------------------------------------------------------------------
# corpora and batches
# ------------------------------------------------------------------------------------------------
def corpus_a() -> tuple[list[str], list[str]]:
    """English prose: (training documents, held-out documents). Help topics, every 8th held out; the
    docstrings of ``CORPUS_A_DOC_MODULES``' public members go to training."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    train = [topics[k] for i, k in enumerate(keys) if i % 8 != 7]
    held = [topics[k] for i, k in enumerate(keys) if i % 8 == 7]
    for name in CORPUS_A_DOC_MODULES:
        mod = __import__(name)
        for attr in sorted(a for a in dir(mod) if not a.startswith("_")):
            doc = inspect.getdoc(getattr(mod, attr))
            if doc:
                train.append(f"{name}.{attr}\n{doc}")
    return train, held


def corpus_b() -> tuple[list[str], list[str]]:
    """Python source: (training files, held-out files) of the standard library, read as UTF-8."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    read = lambda names: [(stdlib / n).read_text(encoding="utf-8") for n in names]  # noqa: E731
    return read(CORPUS_B_TRAIN), read(CORPUS_B_HELDOUT)


def to_stream(docs: list[str]) -> torch.Tensor:
    """The documents' UTF-8 bytes as one id stream, EOS after each document."""
    ids: list[int] = []
    for d in docs:
        ids += list(d.encode("utf-8"))
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long)


def batch_starts(n: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """``steps × batch`` random window starts in a stream of ``n`` ids (each window: SEQ + 1 ids)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n - SEQ - 1, (steps, batch), generator=g)


def windows(stream: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """``[len(starts), SEQ + 1]`` ids; a BOS replaces each window's first id so every window starts alike."""
    x = torch.stack([stream[s:s + SEQ + 1] for s in starts.tolist()])
    x[:, 0] = BOS
    return x


def lm_loss(model: nn.Module, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting ``x[:, 1:]`` from ``x[:, :-1]`` (nats per byte)."""
    logits = model(input_ids=x[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                                       reduction=reduction)


@torch.no_grad()
def perplexity(model: nn.Module, stream: torch.Tensor, max_windows: int | None = None, bs: int = 32) -> float:
    """Per-byte perplexity over consecutive, non-overlapping windows of the stream (the first ``max_windows``)."""
    model.eval()
    starts = torch.arange(0, len(stream) - SEQ - 1, SEQ)[:max_windows]
    total, count = 0.0, 0
    for i in range(0, len(starts), bs):
        x = windows(stream, starts[i:i + bs])
        total += lm_loss(model, x, reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


def schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then linear decay to 0 (finetune.py's rule)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def train_loop(model: nn.Module, params: list, stream: torch.Tensor, starts: torch.Tensor, lr: float,
               warmup: int, weight_decay: float = 0.0) -> list[float]:
    """AdamW (weight decay 0 unless given) over the given batches with :func:`schedule`; returns the losses."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()  # the Llama config has no dropout: train and eval compute the same function
    losses, steps = [], len(starts)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * schedule(step, steps, warmup)
        loss = lm_loss(model, windows(stream, starts[step]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------------------------
# pretraining
# ------------------------------------------------------------------------------------------------
def new_model(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                      tie_word_embeddings=False, **MODEL_SIZES)
    return LlamaForCausalLM(cfg)


def load_model(folder: Path = MODEL_DIR) -> nn.Module:
    """The shipped pretrained model (float32, eval mode)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def pretrain(args) -> int:
    """Pretrain on corpus A (``PRETRAIN`` settings, or ``--steps``), save to ``--model-dir``."""
    cfg = dict(PRETRAIN, steps=args.steps or PRETRAIN["steps"])
    train, held = corpus_a()
    s_train, s_held = to_stream(train), to_stream(held)
    model = new_model(cfg["seed"])
    starts = batch_starts(len(s_train), cfg["steps"], cfg["batch"], cfg["seed"] + 1000)
    t0 = time.perf_counter()
    losses = train_loop(model, list(model.parameters()), s_train, starts, cfg["lr"], cfg["warmup"])
    seconds = time.perf_counter() - t0
    ppl = perplexity(model, s_held)
    folder = Path(args.model_dir)
    model.save_pretrained(folder, safe_serialization=True)
    info = {"corpus": {"train": f"pydoc_data.topics (sorted keys, index % 8 != 7) + inspect.getdoc of the public "
                                f"members of {', '.join(CORPUS_A_DOC_MODULES)}",
                       "heldout": "pydoc_data.topics, sorted keys with index % 8 == 7",
                       "train_bytes": len(s_train), "heldout_bytes": len(s_held)},
            "settings": dict(cfg, seq=SEQ, optimizer="AdamW, weight decay 0", schedule="linear warmup/decay"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_train_loss": statistics.fmean(losses[-50:]), "heldout_ppl": ppl, "seconds": seconds,
            "machine": machine()}
    (folder / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "machine"}, indent=2))
    return 0


# ------------------------------------------------------------------------------------------------
# the study: LoRA against RandLora at equal trainable count, frozen, full fine-tuning
# ------------------------------------------------------------------------------------------------
LABELS = {"frozen": "frozen (no training)", "lora": "LoRA (peft, equal count)",
          "randlora": "RandLora (defaults)", "randlora-wd3": "RandLora, AdamW weight decay 3 on λ/γ",
          "full": "full fine-tuning"}
ORDER = ("lora", "randlora", "randlora-wd3", "full", "frozen")
WEIGHT_DECAY = {"randlora-wd3": 3.0}  # AdamW's decoupled weight decay per method (0 otherwise)


def run_key(spec: dict) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:16]


def lora_ranks(target_count: int, model: nn.Module) -> dict[str, int]:
    """Per-target peft LoRA ranks (1-4 each) on ``LORA_TARGETS`` whose total ``Σ r·(O + I)`` is closest to
    ``target_count``; ties go to the smallest spread of ranks, then the most even (smallest ``Σ rank²``). At r = 32
    here: exactly RandLora's count, attention ranks summing to 10 and MLP ranks to 4."""
    per = {t: sum(m.in_features + m.out_features for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and n.endswith("." + t)) for t in LORA_TARGETS}
    return closest_ranks(per, target_count)


def closest_ranks(per_rank: dict[str, int], target_count: int, max_rank: int = 4) -> dict[str, int]:
    """Ranks (1 to ``max_rank``) per target, given each target's trainable count at rank 1, whose total is
    closest to ``target_count``; ties to the smallest spread of ranks, then the smallest ``Σ rank²``."""
    import itertools

    names, best, best_key = list(per_rank), None, None
    for ranks in itertools.product(range(1, max_rank + 1), repeat=len(names)):
        gap = abs(sum(per_rank[t] * k for t, k in zip(names, ranks)) - target_count)
        key = (gap, max(ranks) - min(ranks), sum(k * k for k in ranks))
        if best_key is None or key < best_key:
            best, best_key = dict(zip(names, ranks)), key
    return best


class Context:
    """The pristine model, corpus B's streams and RandLora's trainable count, loaded once per process."""

    def __init__(self, model_dir: Path, quick: bool, r: int) -> None:
        self.pristine = load_model(model_dir)
        self.model_hash = file_hash(model_dir / "model.safetensors")
        train, held = corpus_b()
        self.train, self.held = to_stream(train), to_stream(held)
        self.eval_windows = 4 if quick else None
        probe = copy.deepcopy(self.pristine)
        randlora.inject(probe, "all-linear", r=r)
        self.randlora_count = sum(p.numel() for p in randlora.trainable_parameters(probe))


def build(spec: dict, ctx: Context) -> tuple[nn.Module, list, str]:
    """A fresh copy of the pretrained model set up for ``spec``: (model, parameters to train, note)."""
    model, method, seed = copy.deepcopy(ctx.pristine), spec["method"], spec["seed"]
    torch.manual_seed(seed)  # LoRA's A initialisation
    if method == "full":
        return model, list(model.parameters()), "every weight trains"
    if method == "frozen":
        return model, [], "no training"
    if method.startswith("randlora"):
        randlora.inject(model, "all-linear", r=spec["r"], seed=seed)  # the bases drawn per seed, like LoRA's A
        wd = WEIGHT_DECAY.get(method, 0.0)
        note = f"r={spec['r']}, alpha=r, init sqrt, dense, bases seed {seed}, weight decay {wd}"
        return model, randlora.trainable_parameters(model), note
    from peft import LoraConfig, get_peft_model

    ranks = lora_ranks(ctx.randlora_count, model)
    r0 = ranks[LORA_TARGETS[0]]
    pattern = {t: k for t, k in ranks.items() if k != r0}
    cfg = LoraConfig(r=r0, lora_alpha=2 * r0, target_modules=list(LORA_TARGETS), lora_dropout=0.0,
                     rank_pattern=pattern, alpha_pattern={t: 2 * k for t, k in pattern.items()})
    model = get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, "ranks " + ", ".join(f"{t[:-5]}={k}" for t, k in ranks.items()) + ", alpha=2·rank"


def train_run(spec: dict, ctx: Context) -> dict:
    """Train one configuration on B's training files; held-out perplexity on B's other files."""
    model, params, note = build(spec, ctx)
    starts = batch_starts(len(ctx.train), spec["steps"] if params else 0, spec["batch"], spec["seed"])
    t0 = time.perf_counter()
    losses = (train_loop(model, params, ctx.train, starts, spec["lr"], max(1, spec["steps"] // 10),
                         WEIGHT_DECAY.get(spec["method"], 0.0)) if params else [])
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    ppl = perplexity(model, ctx.held, ctx.eval_windows)
    tail = losses[-max(1, len(losses) // 10):]
    return {"spec": spec, "note": note, "trainable": sum(p.numel() for p in params), "heldout_ppl": ppl,
            "heldout_nll": math.log(ppl), "final_train_loss": statistics.fmean(tail) if tail else None,
            "losses": [round(x, 5) for x in losses], "seconds": seconds, "eval_seconds": time.perf_counter() - t1,
            "finite": all(math.isfinite(x) for x in losses + [ppl])}


def study_specs(args, ctx: Context) -> list[tuple[str, float, list[dict]]]:
    """``(method, lr, [spec per seed])`` for every row of the table."""
    rows = []
    for method in args.methods:
        lrs = {"frozen": [0.0], "full": args.full_lrs}.get(method, args.lrs)
        for lr in lrs:
            seeds = [0] if method == "frozen" else list(range(args.seeds))
            specs = [{"task": "lm-code", "method": method, "lr": lr, "seed": s, "steps": 0 if method == "frozen"
                      else args.steps, "batch": args.batch, "r": args.r if method in ("lora", "randlora", "randlora-wd3") else None,
                      "model": ctx.model_hash, "eval_windows": ctx.eval_windows} for s in seeds]
            rows.append((method, lr, specs))
    return rows


def run_study(args, ctx: Context, folder: Path) -> dict[str, dict]:
    """Every pending run of this task (:func:`run_cached`)."""
    return run_cached(study_specs(args, ctx), args.seeds, folder, lambda spec: train_run(spec, ctx))


def run_cached(rows: list, seeds: int, folder: Path, train) -> dict[str, dict]:
    """``train(spec)`` for every spec of ``rows`` (:func:`study_specs`) not cached in ``folder`` yet, seed-major (a
    stopped study has every row on its first seeds); each record written as ``<run_key>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    order = [s for k in range(seeds) for _, _, specs in rows for s in specs[k:k + 1]]
    recs = {}
    for spec in order:
        key = run_key(spec)
        path = folder / f"{key}.json"
        if path.is_file():
            recs[key] = json.loads(path.read_text())
            continue
        recs[key] = rec = train(spec)
        write_json(path.name, rec, str(path))
        loss = rec["final_train_loss"]
        print(f"{spec['method']:16s} lr {spec['lr']:g} seed {spec['seed']}: held-out ppl {rec['heldout_ppl']:.4f}, "
              f"train loss {'—' if loss is None else f'{loss:.4f}'}, {rec['seconds']:.1f} s", flush=True)
    return recs


def mean_std(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def summarize(args, ctx: Context, recs: dict[str, dict]) -> list[dict]:
    """One row per (method, lr): the per-seed figures, and RandLora minus LoRA paired by seed at the same lr."""
    rows = []
    for method, lr, specs in study_specs(args, ctx):
        done = [recs[run_key(s)] for s in specs if run_key(s) in recs]
        rows.append({"method": method, "label": LABELS[method], "lr": lr, "note": done[0]["note"] if done else "",
                     "seeds": [r["spec"]["seed"] for r in done], "trainable": done[0]["trainable"] if done else None,
                     "ppl": [r["heldout_ppl"] for r in done], "nll": [r["heldout_nll"] for r in done],
                     "train_loss": [r["final_train_loss"] for r in done if r["final_train_loss"] is not None],
                     "seconds": [r["seconds"] for r in done], "finite": all(r["finite"] for r in done)})
    lora = {row["lr"]: row for row in rows if row["method"] == "lora"}
    for row in rows:
        ref = lora.get(row["lr"]) if row["method"].startswith("randlora") else None
        if ref is not None:
            pairs = [(a, b, p, q) for s, a, p in zip(row["seeds"], row["nll"], row["ppl"])
                     for t, b, q in zip(ref["seeds"], ref["nll"], ref["ppl"]) if s == t]
            row["minus_lora_nll"] = [a - b for a, b, _, _ in pairs]
            row["minus_lora_ppl"] = [p - q for _, _, p, q in pairs]
    return rows


def table(rows: list[dict]) -> str:
    headers = ["method", "trainable", "lr", "seeds", "held-out ppl (mean ± std)",
               "RandLora − LoRA, Δ log-ppl by seed", "Δ ppl (mean)", "final train loss", "s / run"]
    out = []
    for row in rows:
        d = row.get("minus_lora_nll")
        by_seed = " / ".join(f"{x:+.4f}" for x in d) if d else ""
        dppl = f"{statistics.fmean(row['minus_lora_ppl']):+.3f}" if d else ""
        out.append([row["label"], f"{row['trainable']:,}" if row["trainable"] is not None else "—",
                    f"{row['lr']:g}" if row["lr"] else "—", len(row["seeds"]), mean_std(row["ppl"]), by_seed, dppl,
                    mean_std(row["train_loss"]), f"{median(row['seconds']):.0f}" if row["train_loss"] else "—"])
    return markdown_table(headers, out)


def study(args) -> int:
    """Run (or resume) the study, then write lm_study.json / .md under ``--out`` and print the table."""
    ctx = Context(Path(args.model_dir), args.quick, args.r)
    out = Path(args.out)
    recs = run_study(args, ctx, out / "lm_runs")
    rows = summarize(args, ctx, recs)
    md = table(rows)
    lora = [r for r in rows if r["method"] == "lora"]
    head = (f"Corpus B: train {', '.join(CORPUS_B_TRAIN)} ({len(ctx.train):,} bytes); held-out "
            f"{', '.join(CORPUS_B_HELDOUT)} ({len(ctx.held):,} bytes). {args.steps} steps × {args.batch} windows of "
            f"{SEQ} bytes. RandLora r={args.r}: {ctx.randlora_count:,} trainable; LoRA "
            f"{lora[0]['note'] if lora else ''}.")
    write_json("lm_study.json", {"settings": {k: v for k, v in vars(args).items()}, "header": head, "rows": rows,
                                 "machine": machine()}, str(out / "lm_study.json"))
    (out / "lm_study.md").write_text(head + "\n\n" + md + "\n")
    print(head + "\n\n" + md)
    return 0 if all(r["finite"] for r in rows) else 1


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def command_line(doc: str, pretrain_steps: int, model_dir: Path, out_dir: Path, methods: list[str],
                 lrs: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``pretrain`` / ``study`` command line of a generative task (this one and ``moe_lm.py``): the parser and
    its ``study`` subparser, for the task's own options."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="pretrain the tiny LM on corpus A and save it")
    pre.add_argument("--steps", type=int, default=None, help=f"default {pretrain_steps}")
    pre.add_argument("--model-dir", default=str(model_dir))
    st = sub.add_parser("study", help="adapt the pretrained model to corpus B with each method")
    st.add_argument("--quick", action="store_true", help="smoke run: 4 steps of 4 windows, 1 seed, 4 eval windows")
    st.add_argument("--seeds", type=int, default=3)
    st.add_argument("--lrs", default=lrs, help="learning rates of the adapters")
    st.add_argument("--methods", default=",".join(methods))
    st.add_argument("--steps", type=int, default=400)
    st.add_argument("--batch", type=int, default=16)
    st.add_argument("--r", type=int, default=32, help="RandLora's r (LoRA is matched to its trainable count)")
    st.add_argument("--model-dir", default=str(model_dir))
    st.add_argument("--out", default=str(out_dir))
    return p, st


def parse(argv: list[str] | None) -> argparse.Namespace:
    p, st = command_line(__doc__, PRETRAIN["steps"], MODEL_DIR, OUT_DIR, ORDER, "3e-3,1e-3")
    st.add_argument("--full-lrs", default="3e-4,1e-4", help="full fine-tuning's rates ('' for none)")
    args = p.parse_args(argv)
    if args.command == "study":
        floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
        args.lrs, args.full_lrs, args.methods = floats(args.lrs), floats(args.full_lrs), args.methods.split(",")
        if args.quick:
            args.seeds, args.steps, args.batch = 1, 4, 4
            args.lrs, args.full_lrs = args.lrs[:1], args.full_lrs[:1]
    return args


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    args = parse(argv)
    return pretrain(args) if args.command == "pretrain" else study(args)


if __name__ == "__main__":
    sys.exit(main())
