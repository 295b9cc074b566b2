"""Export a TRAINED RandLora adapter to LoRA: per-layer error, output change and task accuracy per setting.

``benchmarks/export.py`` measures the export on synthetic ``λ``/``γ``; this script trains a real adapter
and measures what a truncated export keeps of it. Model and task: all-MiniLM-L6-v2 plus a linear head on
the method-name task of ``benchmarks/finetune.py`` (its data, model loading, ``build`` and ``train_one``:
RandLora's defaults on its targets ``query`` and ``value``, r = 32, AdamW with warmup and linear decay,
dropout off), trained for ``--steps`` steps. Then, per export setting (fixed ranks, energies, ``rank="full"``), :func:`randlora.save_lora`
writes a peft LoRA folder of the encoder, peft loads it onto a fresh copy of the pretrained encoder (the
trained head copied), and on the test split the script reports:

- the per-layer relative error ``‖s·ΔW − B A‖_F / ‖s·ΔW‖_F`` (mean and largest) and ranks chosen,
- the relative change of the logits against the RandLora model, both against the logits themselves and
  against the adapter's effect on them (``‖y_RandLora − y_base‖``, ``y_base`` = adapter disabled),
- the LoRA model's test accuracy, and the share of test texts where its prediction equals RandLora's.

    python benchmarks/export_trained.py           # 27 min on 2 cores shared with other jobs, 18 of them training
    python benchmarks/export_trained.py --quick   # smoke run (about a minute)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune as ft  # noqa: E402  (sets the offline environment before transformers is imported)
from _common import machine, markdown_table, write_json  # noqa: E402

SETTINGS = ["rank=8", "rank=32", "rank=64", "energy=0.9", "energy=0.95", "energy=0.99", "energy=0.999", "rank=full"]


def parse(setting: str) -> dict:
    key, value = setting.split("=")
    if key == "rank":
        return {"rank": value if value == "full" else int(value)}
    return {"energy": float(value)}


def train(args):
    """The trained RandLora classifier, the pristine encoder and the tokenized test split."""
    ds = ft.load_code_task("code-tests", seed=args.seed)
    pristine, tok = ft.load_encoder()
    data = {"classes": ds.classes, "train": ft.tokenize(tok, ds.train, args.max_len),
            "val": ft.tokenize(tok, ds.val, args.max_len),
            "test": ft.tokenize(tok, ds.test, args.max_len)}
    if args.quick:
        for k in ("val", "test"):
            data[k] = ft.Tokens(data[k].ids[:64], data[k].labels[:64])
    g = ft.torch.Generator().manual_seed(args.seed)
    n = len(data["train"])
    batches = []
    while len(batches) < args.steps:
        perm = ft.torch.randperm(n, generator=g).tolist()
        batches += [perm[i:i + args.batch] for i in range(0, n - args.batch + 1, args.batch)]
    if args.targets:
        ft.TARGETS = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    opts = types.SimpleNamespace(seed=args.seed, r=args.r, alpha_scale=None, init=ft.randlora.DEFAULT_INIT)
    run, model = ft.train_one("randlora", args.lr, 1e-2, pristine, data, batches[:args.steps], opts, None, "train")
    print(f"trained {args.steps} steps in {run.seconds:.0f} s: val acc {100 * run.val_acc:.1f} %, last losses "
          f"{statistics.mean(run.losses[-20:]):.3f}", flush=True)
    return model.eval(), pristine, data["test"]


def lora_classifier(folder: Path, pristine, head):
    """The pretrained encoder with peft's LoRA from ``folder``, and a copy of the trained head."""
    import peft

    enc = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(folder)).eval()
    model = ft.Classifier(enc, head.out_features)
    model.head.load_state_dict(head.state_dict())
    return model.eval()


def measure(model, pristine, test, settings):
    import randlora

    y = ft.predict_logits(model, test).double()
    with randlora.disabled(model):
        effect = float((y - ft.predict_logits(model, test).double()).norm())
    pred, labels = y.argmax(-1), test.labels
    rows, raw, per_layer = [], [], {}
    for s in settings:
        with tempfile.TemporaryDirectory() as td:
            t0 = time.perf_counter()
            exp = randlora.save_lora(model.encoder, Path(td) / "lora", **parse(s))
            secs = time.perf_counter() - t0
            y_l = ft.predict_logits(lora_classifier(Path(td) / "lora", pristine, model.head), test).double()
        errs, ranks = [l.error for l in exp.layers.values()], sorted(exp.ranks.values())
        diff = float((y_l - y).norm())
        row = {"setting": s, "mean_err": sum(errs) / len(errs), "max_err": max(errs), "ranks": ranks,
               "params": exp.parameters, "out_err": diff / float(y.norm()), "out_err_effect": diff / effect,
               "acc": ft.accuracy(y_l, labels), "agree": float((y_l.argmax(-1) == pred).float().mean()),
               "seconds": secs}
        raw.append(row)
        per_layer[s] = {p: (l.rank, l.error, l.energy) for p, l in exp.layers.items()}
        rows.append([s, f"{ranks[0]}–{ranks[len(ranks) // 2]}–{ranks[-1]}", f"{row['mean_err']:.3g}",
                     f"{row['max_err']:.3g}", f"{row['out_err']:.2e}", f"{row['out_err_effect']:.3g}",
                     f"{100 * row['acc']:.1f} %", f"{100 * row['agree']:.1f} %", f"{exp.parameters:,}",
                     f"{secs:.1f} s"])
        print(rows[-1], flush=True)
    headers = ["export", "ranks (min–median–max)", "ΔW error (mean)", "ΔW error (max)", "output error (of logits)",
               "output error (of the adapter's effect)", "test acc", "same prediction as RandLora", "LoRA params",
               "save_lora"]
    return markdown_table(headers, rows), raw, per_layer, ft.accuracy(y, labels)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few steps and 64 test texts: a smoke run")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 300; quick 4)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=32, help="tokens per text")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--targets", default=None, help="'all-linear' or comma-separated module names (default: "
                    f"finetune.py's, {','.join(ft.TARGETS)})")
    ap.add_argument("--settings", nargs="*", default=None, help=f"export settings (default {' '.join(SETTINGS)})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="JSON output path (default benchmarks/out/export_trained.json)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 300)
    if args.threads > 0:
        ft.torch.set_num_threads(args.threads)
    settings = args.settings or (["rank=4", "energy=0.99", "rank=full"] if args.quick else SETTINGS)
    info = machine()
    print(f"machine: {info}", flush=True)
    t0 = time.perf_counter()
    model, pristine, test = train(args)
    table, raw, per_layer, acc = measure(model, pristine, test, settings)
    print(f"RandLora model: test acc {100 * acc:.1f} % on {len(test)} texts")
    print(table)
    print(f"total {time.perf_counter() - t0:.0f} s")
    path = write_json("export_trained.json", {"machine": info, "args": vars(args), "randlora_acc": acc,
                                              "rows": raw, "per_layer": per_layer, "table": table}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
