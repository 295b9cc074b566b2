"""Export to LoRA: reconstruction error, model-output error and conversion time per rank.

Model: the step benchmark's Llama (hidden 1024, MLP 2816, 4 layers, 16 heads, vocab 4096, random weights,
fp32), RandLora on all seven linear layers of every block, r = 32, alpha 640. ``λ``/``γ`` get trained-like
values: ``λ ~ N(0, 1)``, ``γ = (1 + spread·N(0, 1)) / m`` around its initial value, then each layer's
``λ`` is scaled so that ``‖s·ΔW‖_F = update · ‖W‖_F``. Profiles: ``spread`` 0.5 (trained-like) and
``iid`` (``γ ~ N(0, 1) / m``: no shared component, the flattest spectrum; the hardest case).

Per rank: the relative reconstruction error ``‖s·ΔW − B A‖_F / ‖s·ΔW‖_F`` (mean and largest over the 28
layers), the relative model-output error of the logits against the RandLora model, both against the
logits themselves and against the adapter's effect ``‖y − y_base‖_F``, and the time of
:func:`randlora.to_lora` (``method="auto"`` and ``"svd"``) plus writing the folder. A second table times
one layer's full SVD against the randomized one per rank and gives the randomized error over the optimal.

    python benchmarks/export.py                  # about 10 min, one thread
    python benchmarks/export.py --quick          # a small model: a smoke run
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, median, write_json  # noqa: E402

SIZE = {"hidden": 1024, "mlp": 2816, "layers": 4, "heads": 16, "vocab": 4096}
QUICK = {"hidden": 128, "mlp": 352, "layers": 2, "heads": 4, "vocab": 256}


def build(size, seq):
    import torch
    from step import build_model

    return build_model({"size": size, "seq": seq, "device": "cpu", "dtype": "fp32"})


def trained_like(model, profile: str, update: float, seed: int = 0) -> None:
    """Set λ/γ as described in the module docstring."""
    import torch

    from randlora.walker import adapted_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, l in adapted_layers(model):
            lam, gam = l.randlora_lambda, l.randlora_gamma
            lam.copy_(torch.randn(lam.shape, generator=g))
            noise = torch.randn(gam.shape, generator=g)
            if profile == "iid":
                gam.copy_(noise / l.m)
            else:
                gam.copy_((1 + float(profile) * noise) / l.m)
            ratio = float(l.delta_weight().norm()) / float(l.weight_matrix().float().norm())
            lam.mul_(update / ratio)


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def with_lora(model, exp, ids):
    """Logits of the base weights plus each layer's ``B A`` (what peft computes from the folder)."""
    import torch

    import randlora
    from randlora.walker import adapted_layers

    layers = dict(adapted_layers(model))
    saved = {}
    with torch.no_grad(), randlora.disabled(model):
        for p, l in exp.layers.items():
            W = layers[p].weight_matrix()
            saved[p] = W.clone()
            W.add_((l.lora_B.float() @ l.lora_A.float()).to(W.dtype))
        try:
            return logits(model, ids)
        finally:
            for p, W0 in saved.items():
                layers[p].weight_matrix().copy_(W0)


def layer_table(shapes, ranks, reps):
    """One layer: torch.linalg.svd against torch.svd_lowrank (the export's settings) per rank."""
    import torch
    from torch import nn

    import randlora
    from randlora import export as ex

    rows, raw = [], []
    for O, I in shapes:
        m = nn.Sequential()
        m.add_module("l", nn.Linear(I, O))
        randlora.inject(m, ["l"], r=32, alpha=640)
        trained_like(m, "0.5", 0.05)
        D = m.l.delta_weight().detach()
        S = torch.linalg.svdvals(D.double())
        t_svd = []
        t_low = {k: [] for k in ranks}
        err = {}
        for _ in range(reps):  # alternate the methods within each repetition
            t0 = time.perf_counter()
            ex.factor(D, rank=max(ranks), method="svd")
            t_svd.append(time.perf_counter() - t0)
            for k in ranks:
                if k + ex._OVERSAMPLE > min(O, I):
                    continue
                t0 = time.perf_counter()
                _, _, _, e, _ = ex.factor(D, rank=k, method="lowrank")
                t_low[k].append(time.perf_counter() - t0)
                err[k] = e
        for k in ranks:
            if not t_low[k]:
                continue
            opt = float((S[k:] ** 2).sum().sqrt() / S.norm())
            row = {"O": O, "I": I, "k": k, "svd_s": median(t_svd), "lowrank_s": median(t_low[k]),
                   "lowrank_err": err[k], "optimal_err": opt}
            raw.append(row)
            rows.append([f"{O}×{I}", k, f"{(k + ex._OVERSAMPLE) / min(O, I):.3f}", f"{row['svd_s'] * 1e3:.0f} ms",
                         f"{row['lowrank_s'] * 1e3:.0f} ms", f"{row['svd_s'] / row['lowrank_s']:.1f}×",
                         f"{opt:.4f}", f"{err[k] / opt:.5f}"])
    headers = ["layer", "rank k", "(k+16)/min(O,I)", "full SVD", "randomized", "speed-up", "optimal error",
               "randomized / optimal"]
    return markdown_table(headers, rows), raw


def model_table(size, ranks, profiles, update, seq, compare_svd):
    import torch

    import randlora

    torch.manual_seed(0)
    ids = torch.randint(0, size["vocab"], (2, seq), generator=torch.Generator().manual_seed(1))
    model = build(size, seq).eval()
    y_base = logits(model, ids)
    randlora.inject(model, "all-linear", r=32, alpha=640.0)
    rows, raw = [], []
    for profile in profiles:
        trained_like(model, profile, update)
        y = logits(model, ids)
        effect = float((y - y_base).norm())
        for rank in ranks:
            t0 = time.perf_counter()
            exp = randlora.to_lora(model, rank=rank)
            t_auto = time.perf_counter() - t0
            t_svd = None
            if compare_svd and rank != "full":
                t0 = time.perf_counter()
                ref = randlora.to_lora(model, rank=rank, method="svd")
                t_svd = time.perf_counter() - t0
                opt = max(ref.layers[p].error for p in ref.layers)
                del ref
            else:
                opt = None
            folder = Path(tempfile.mkdtemp()) / "lora"
            t0 = time.perf_counter()
            randlora.save_lora(exp, folder)
            t_write = time.perf_counter() - t0
            mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
            shutil.rmtree(folder.parent)
            y_l = with_lora(model, exp, ids)
            errs = [l.error for l in exp.layers.values()]
            diff = float((y_l - y).norm())
            row = {"profile": profile, "rank": rank, "mean_err": sum(errs) / len(errs), "max_err": max(errs),
                   "max_err_svd": opt, "out_err": diff / float(y.norm()), "out_err_effect": diff / effect,
                   "to_lora_s": t_auto, "to_lora_svd_s": t_svd, "write_s": t_write, "params": exp.parameters,
                   "mb": mb}
            raw.append(row)
            label = "γ spread 0.5" if profile != "iid" else "γ iid"
            rows.append([label, rank, f"{row['mean_err']:.3g}", f"{row['max_err']:.3g}",
                         f"{row['out_err']:.2e}", f"{row['out_err_effect']:.3g}", f"{exp.parameters:,}",
                         f"{mb:.1f} MB", f"{t_auto:.2f} s", f"{t_svd:.2f} s" if t_svd is not None else "—",
                         f"{t_write:.2f} s"])
            print(rows[-1], flush=True)
    headers = ["λ/γ", "rank", "ΔW error (mean)", "ΔW error (max)", "output error (of logits)",
               "output error (of the adapter's effect)", "LoRA params", "folder", "to_lora (auto)",
               "to_lora (full SVD)", "write"]
    return markdown_table(headers, rows), raw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small model and few ranks: a smoke run")
    ap.add_argument("--ranks", nargs="*", default=None, help="LoRA ranks (ints or 'full')")
    ap.add_argument("--update", type=float, default=0.05, help="‖s·ΔW‖_F / ‖W‖_F of every layer")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence of the 2-sequence logits batch")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the one-layer timing")
    ap.add_argument("--no-svd", action="store_true", help="skip the full-SVD timing of the model")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable figures on a shared machine; 0: torch's default)")
    ap.add_argument("--out", default=None, help="JSON output path (default benchmarks/out/export.json)")
    args = ap.parse_args(argv)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    size = QUICK if args.quick else SIZE
    ranks = args.ranks or (["4", "16", "full"] if args.quick else ["8", "32", "128", "full"])
    ranks = [r if r == "full" else int(r) for r in ranks]
    shapes = [(size["hidden"], size["hidden"]), (size["mlp"], size["hidden"])]
    lranks = [8, 32] if args.quick else [8, 32, 128, 256, 496]
    info = machine()
    print(f"machine: {info}", flush=True)
    ltable, lraw = layer_table(shapes, lranks, 1 if args.quick else args.reps)
    print(ltable, flush=True)
    mtable, mraw = model_table(size, ranks, ["0.5", "iid"], args.update, 16 if args.quick else args.seq,
                               not args.no_svd)
    print(mtable)
    path = write_json("export.json", {"machine": info, "size": size, "update": args.update, "layer": lraw,
                                      "model": mraw, "layer_table": ltable, "model_table": mtable}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
