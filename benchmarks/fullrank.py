"""Full-rank recovery: can an adapter learn a known full-rank change of a pretrained model?

Teacher: all-MiniLM-L6-v2 with a known full-rank ``ΔW*`` added to its attention projections
(``query`` and ``value`` of every layer, ``‖ΔW*‖_F = rho · ‖W‖_F`` per layer). ``ΔW*`` (``--target``) is
full rank with a decaying spectrum by default (``U diag(k^-decay) Vᵀ``, random singular vectors: a few
strong directions and a long tail, like real fine-tuning updates), or i.i.d. Gaussian (a flat spectrum).
Students: the pretrained model with one adapter on the same layers, every adapter with the SAME
number of trainable values per layer, trained with AdamW to match the teacher's last hidden states
(masked MSE) on standard-library docstrings (``benchmarks/data.py``):

- RandLora (this library), rank ``r``: ``n·r + n·m`` values, ``n = ceil(m / r)``;
- LoRA (peft's, else a minimal one), ``ΔW = (alpha/k) B A``: ``k·(O + I)`` values;
- VeRA-like (defined here), ``ΔW = diag(b) B diag(d) A`` with ``A``, ``B`` random, frozen and shared by
  all layers: ``k_v + O`` values (``d``: ``k_v``, ``b``: ``O``).

Each method tries the same number of learning rates; the lowest held-out output error wins.
Reported per method: held-out output error relative to the untouched model's
(``‖h − h*‖ / ‖h₀ − h*‖``), ``‖ΔW − ΔW*‖_F / ‖ΔW*‖_F`` and the cosine between them (over all
adapted layers), the numerical rank of the learned ``ΔW``, and the singular-value spectra (plot).

    python benchmarks/fullrank.py            # about 4-5 minutes on a 2-core CPU
    python benchmarks/fullrank.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import load_docstrings  # noqa: E402
from finetune import HERE, MiniLoRA, Tokens, load_encoder, release_memory, tokenize  # noqa: E402

import randlora  # noqa: E402

TARGETS = ("query", "value")
METHODS = ("randlora", "lora", "vera")
LABELS = {"randlora": "RandLora", "lora": "LoRA", "vera": "VeRA-like"}
# Per unit of trained value, s·ΔW moves about 1 (RandLora, alpha = 20·r as passed below), 0.1 (LoRA, alpha = 2k,
# Kaiming A) and 0.002 (VeRA-like, d = 0.1, Kaiming A and B of width 1152): hence the three ranges.
# --lrs 1 (and --quick) uses the first of each list.
LR_GRID = {
    "randlora": [1e-3, 3e-3],
    "lora": [1e-2, 3e-2],
    "vera": [3e-1, 1.0],
}


# ------------------------------------------------------------------------------------------------
# adapters defined here
# ------------------------------------------------------------------------------------------------
class VeraLinear(nn.Module):
    """``y = x (W + diag(b) B diag(d) A)ᵀ + bias``; ``A (k, I)``, ``B (O, k)`` frozen, shared by all layers.

    Initialised like VeRA: ``b = 0`` (so ``ΔW = 0``), ``d = d_init``.
    """

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, d_init: float = 0.1) -> None:
        super().__init__()
        self.base = base
        O, I = base.weight.shape
        object.__setattr__(self, "_A", A)  # shared, not registered: one copy for all layers
        object.__setattr__(self, "_B", B)
        dt = base.weight.dtype
        self.vera_d = nn.Parameter(torch.full((A.shape[0],), d_init, dtype=dt))
        self.vera_b = nn.Parameter(torch.zeros(O, dtype=dt))
        self.O, self.I = O, I

    def delta_weight(self) -> torch.Tensor:
        A, B = self._A[:, : self.I], self._B[: self.O]
        return self.vera_b[:, None] * ((B * self.vera_d) @ A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight + self.delta_weight(), self.base.bias)


def target_names(enc: nn.Module) -> list[str]:
    return [n for n, m in enc.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]


def _set(enc: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(enc.get_submodule(parent), child, mod)


@dataclass
class Student:
    method: str
    model: nn.Module
    detail: str
    deltas: object  # callable -> {layer name: ΔW}
    per_layer: int


def make_student(method: str, pristine: nn.Module, r: int, seed: int) -> Student:
    enc = copy.deepcopy(pristine)
    names = target_names(enc)
    shapes = {n: tuple(enc.get_submodule(n).weight.shape) for n in names}
    O, I = shapes[names[0]]
    m = min(O, I)
    n = math.ceil(m / r)
    budget = n * r + n * m  # RandLora's count per layer; the others are sized to it
    for p in enc.parameters():
        p.requires_grad_(False)
    if method == "randlora":
        randlora.inject(enc, targets=list(TARGETS), r=r, alpha=20.0 * r, seed=seed)  # the scale its lr grid was set for
        layers = {nm: enc.get_submodule(nm) for nm in names}
        return Student(method, enc, f"r={r}, n={n}", lambda: {k: l.delta_weight() for k, l in layers.items()},
                       budget)
    if method == "lora":
        k = max(1, round(budget / (O + I)))
        torch.manual_seed(seed)
        try:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(enc, LoraConfig(r=k, lora_alpha=2 * k, target_modules=list(TARGETS),
                                                   lora_dropout=0.0))
            layers = {nm: model.base_model.model.get_submodule(nm) for nm in names}
            fn = lambda: {nm: l.get_delta_weight("default") for nm, l in layers.items()}  # noqa: E731
            kind = "peft"
        except ImportError:
            model = enc
            layers = {}
            for nm in names:
                layers[nm] = MiniLoRA(enc.get_submodule(nm), k, 2 * k)
                _set(enc, nm, layers[nm])
            fn = lambda: {nm: l.delta_weight() for nm, l in layers.items()}  # noqa: E731
            kind = "minimal"
        return Student(method, model, f"{kind}, rank {k}", fn, k * (O + I))
    if method == "vera":
        kv = budget - O
        g = torch.Generator().manual_seed(seed + 1)
        A = torch.empty(kv, max(s[1] for s in shapes.values()))
        B = torch.empty(max(s[0] for s in shapes.values()), kv)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
        nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=g)
        layers = {}
        for nm in names:
            layers[nm] = VeraLinear(enc.get_submodule(nm), A, B)
            _set(enc, nm, layers[nm])
        return Student(method, enc, f"shared rank {kv}", lambda: {k: l.delta_weight() for k, l in layers.items()},
                       kv + O)
    raise ValueError(method)


# ------------------------------------------------------------------------------------------------
def target_update(shape: tuple[int, int], kind: str, decay: float, g: torch.Generator) -> torch.Tensor:
    """A random ``ΔW*`` of ``shape`` (unnormalised).

    ``"gaussian"``: i.i.d. entries (a flat spectrum: the hardest case for any budget-limited adapter).
    ``"decaying"``: ``U diag(σ) Vᵀ`` with Haar-random orthonormal ``U``, ``V`` and ``σ_k = k^-decay``, the
    kind of spectrum fine-tuning updates have (a few strong directions and a long tail), still full rank.
    """
    if kind == "gaussian":
        return torch.randn(shape, generator=g)
    O, I = shape
    k = min(O, I)
    U, _ = torch.linalg.qr(torch.randn(O, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(I, k, generator=g, dtype=torch.float64))
    sigma = torch.arange(1, k + 1, dtype=torch.float64) ** -decay
    return ((U * sigma) @ V.t()).float()


# ------------------------------------------------------------------------------------------------
def hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


def masked_sq(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2 * mask.unsqueeze(-1)).sum()


def spectrum(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(M.detach().double())


def numerical_rank(s: torch.Tensor, rel: float = 1e-3) -> int:
    return int((s > rel * s[0]).sum())


def effective_rank(s: torch.Tensor) -> float:
    """``exp(entropy of σ / Σσ)`` (Roy & Vetterli): 1 for rank one, ``m`` for a flat spectrum."""
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@dataclass
class Result:
    method: str
    lr: float
    detail: str = ""
    per_layer: int = 0
    trainable: int = 0
    out_err: float = 0.0
    w_err: float = 0.0
    cosine: float = 0.0
    num_rank: float = 0.0
    eff_rank: float = 0.0
    losses: list[float] = field(default_factory=list)
    step_ms: float = 0.0
    seconds: float = 0.0
    spectra: dict[str, list[float]] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, one learning rate")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 80; quick 8)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--r", type=int, default=128, help="RandLora rank; sets the per-layer budget n·r + n·m")
    ap.add_argument("--rho", type=float, default=0.3, help="‖ΔW*‖_F / ‖W‖_F per adapted layer")
    ap.add_argument("--target", choices=("decaying", "gaussian"), default="decaying",
                    help="ΔW*: random singular vectors with σ_k ∝ k^-decay, or i.i.d. Gaussian entries")
    ap.add_argument("--decay", type=float, default=1.0, help="exponent of the decaying spectrum")
    ap.add_argument("--lrs", type=int, default=None, help="learning rates tried per method (default 2; quick 1)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy machine)")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args(argv)
    steps = args.steps or (8 if args.quick else 80)
    n_lrs = args.lrs or (1 if args.quick else len(LR_GRID["lora"]))
    methods = [m for m in METHODS if m in args.methods.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    ds = load_docstrings(seed=args.seed)
    pristine, tok = load_encoder()
    for p in pristine.parameters():
        p.requires_grad_(False)
    train = tokenize(tok, ds.train, args.max_len)
    held = tokenize(tok, ds.val, args.max_len)
    if args.quick:
        held = Tokens(held.ids[:64], held.labels[:64])

    # teacher: W + ΔW* on every target layer
    names = target_names(pristine)
    g = torch.Generator().manual_seed(10_000 + args.seed)
    dstar: dict[str, torch.Tensor] = {}
    teacher = copy.deepcopy(pristine)
    with torch.no_grad():
        for nm in names:
            W = teacher.get_submodule(nm).weight
            G = target_update(tuple(W.shape), args.target, args.decay, g)
            dstar[nm] = G * (args.rho * W.norm() / G.norm())
            W.add_(dstar[nm])
    star_spec = {nm: spectrum(d) for nm, d in dstar.items()}
    kind = "Gaussian" if args.target == "gaussian" else f"decaying-spectrum (σ_k ∝ k^-{args.decay:g})"
    print(f"teacher: pretrained all-MiniLM-L6-v2 + {kind} ΔW* on {len(names)} attention projections "
          f"({', '.join(TARGETS)} x {len(names) // len(TARGETS)} layers), ‖ΔW*‖ = {args.rho} ‖W‖ per layer; "
          f"numerical rank of ΔW* {min(numerical_rank(s) for s in star_spec.values())}"
          f"-{max(numerical_rank(s) for s in star_spec.values())} of {min(dstar[names[0]].shape)}")

    gen = torch.Generator().manual_seed(args.seed)
    batches: list[list[int]] = []
    while len(batches) < steps:
        perm = torch.randperm(len(train), generator=gen).tolist()
        batches += [perm[i:i + args.batch] for i in range(0, len(train) - args.batch + 1, args.batch)]
    batches = batches[:steps]
    with torch.no_grad():
        targets = [hidden(teacher, *train.batch(b)[:2]) for b in batches]
        held_b = [list(range(i, min(i + 64, len(held)))) for i in range(0, len(held), 64)]
        held_in = [held.batch(b)[:2] for b in held_b]
        held_t = [hidden(teacher, ids, mask) for ids, mask in held_in]
        held_0 = [hidden(pristine, ids, mask) for ids, mask in held_in]
        base_err = math.sqrt(sum(masked_sq(a, b, mk).item() for a, b, (_, mk) in zip(held_0, held_t, held_in)))
    del teacher
    print(f"data: {len(train)} training docstrings, {len(held)} held-out; {steps} steps of {args.batch} "
          f"(<= {args.max_len} tokens); {n_lrs} learning rate(s) per method, lowest held-out output error wins")

    results: list[Result] = []
    best: dict[str, Result] = {}
    for method in methods:
        grid = LR_GRID[method]
        lrs = grid[:n_lrs]
        for i, lr in enumerate(lrs):
            st = make_student(method, pristine, args.r, args.seed)
            params = [p for p in st.model.parameters() if p.requires_grad]
            res = Result(method, lr, st.detail, st.per_layer, sum(p.numel() for p in params))
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            st.model.eval()
            warm = max(1, steps // 10)
            times = []
            t0 = time.perf_counter()
            bar = tqdm(list(zip(batches, targets)), desc=f"{LABELS[method]:<9} lr {lr:g} ({i + 1}/{len(lrs)})",
                       leave=False, dynamic_ncols=True, mininterval=0.5)
            for step, (b, tgt) in enumerate(bar):
                ts = time.perf_counter()
                for grp in opt.param_groups:
                    grp["lr"] = lr * ((step + 1) / warm if step < warm else (steps - step) / max(1, steps - warm))
                ids, mask, _ = train.batch(b)
                loss = masked_sq(hidden(st.model, ids, mask), tgt, mask) / (mask.sum() * tgt.shape[-1])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - ts)
                res.losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.2e}", refresh=False)
            bar.close()
            res.seconds = time.perf_counter() - t0
            res.step_ms = 1e3 * statistics.median(times)
            with torch.no_grad():
                err = math.sqrt(sum(masked_sq(hidden(st.model, ids, mk), t, mk).item()
                                    for (ids, mk), t in zip(held_in, held_t)))
                res.out_err = err / base_err
                deltas = st.deltas()
                num = sum((deltas[nm].double() - dstar[nm].double()).pow(2).sum() for nm in names)
                den = sum(dstar[nm].double().pow(2).sum() for nm in names)
                dot = sum((deltas[nm].double() * dstar[nm].double()).sum() for nm in names)
                dn = math.sqrt(sum(deltas[nm].double().pow(2).sum().item() for nm in names))
                res.w_err = math.sqrt(num.item() / den.item())
                res.cosine = dot.item() / max(dn * math.sqrt(den.item()), 1e-30)
                specs = {nm: spectrum(deltas[nm]) for nm in names}
                res.num_rank = statistics.fmean(numerical_rank(s) for s in specs.values())
                res.eff_rank = statistics.fmean(effective_rank(s) for s in specs.values())
                res.spectra = {nm: s.tolist() for nm, s in specs.items()}
            print(f"  {LABELS[method]:<9} lr {lr:<6g} output error {res.out_err:.4f}  ‖ΔW−ΔW*‖/‖ΔW*‖ "
                  f"{res.w_err:.4f}  median step {res.step_ms:.0f} ms ({res.seconds:.1f} s)")
            results.append(res)
            if method not in best or res.out_err < best[method].out_err:
                best[method] = res
            del st, opt, params
            release_memory()

    # references: the untouched model, and the best rank-k approximation of ΔW* (Eckart-Young)
    lines = ["| method | trainable per layer (total) | best lr | held-out output error (rel.) | "
             "‖ΔW−ΔW*‖/‖ΔW*‖ | cos(ΔW, ΔW*) | numerical rank of ΔW | effective rank | median step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines.append("| no update (pretrained) | 0 | - | 1.0000 | 1.0000 | - | 0 | - | - |")
    for m in methods:
        r = best[m]
        lines.append(f"| {LABELS[m]} ({r.detail}) | {r.per_layer:,} ({r.trainable:,}) | {r.lr:g} | {r.out_err:.4f} | "
                     f"{r.w_err:.4f} | {r.cosine:.4f} | {r.num_rank:.0f} | {r.eff_rank:.1f} | {r.step_ms:.0f} ms |")
    if "lora" in best:
        k = int(best["lora"].detail.rsplit(" ", 1)[-1])
        resid = sum(float((s[k:] ** 2).sum()) for s in star_spec.values())
        tot = sum(float((s ** 2).sum()) for s in star_spec.values())
        lines.append(f"| reference: best rank-{k} approximation of ΔW* (SVD) | - | - | - | {math.sqrt(resid / tot):.4f} | "
                     f"{math.sqrt(1 - resid / tot):.4f} | {k} | - | - |")
    ref_eff = statistics.fmean(effective_rank(s) for s in star_spec.values())
    lines.append(f"| reference: ΔW* itself | - | - | 0 | 0 | 1 | {min(dstar[names[0]].shape)} | {ref_eff:.1f} | - |")
    tab = "\n".join(lines)
    print()
    print(tab)

    png = args.out / "fullrank_spectra.png"
    layer = names[0]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        s = star_spec[layer]
        ax1.semilogy(range(1, len(s) + 1), s.numpy(), "k--", label="ΔW* (target)")
        for m in methods:
            sp = torch.tensor(best[m].spectra[layer])
            ax1.semilogy(range(1, len(sp) + 1), sp.clamp_min(1e-12).numpy(), label=LABELS[m])
        ax1.set_ylim(bottom=max(1e-6, float(s.min()) * 1e-4))
        ax1.set_xlabel("index")
        ax1.set_ylabel("singular value")
        ax1.set_title(f"spectra, {layer}")
        ax1.legend()
        ax1.grid(alpha=0.3)
        for m in methods:
            ax2.semilogy(best[m].losses, label=f"{LABELS[m]} (lr {best[m].lr:g})")
        ax2.set_xlabel("step")
        ax2.set_ylabel("training MSE to the teacher")
        ax2.set_title("training loss")
        ax2.legend()
        ax2.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
        plotted = True
    except ImportError:
        plotted = False
    total = time.perf_counter() - t_all
    print(f"\nspectra plot: {png if plotted else 'not written (matplotlib missing)'}; total {total:.0f} s")
    (args.out / "fullrank_results.md").write_text(tab + f"\n\n- {steps} steps x {args.batch}, rho {args.rho}, "
                                                  f"target {args.target} (decay {args.decay:g}), "
                                                  f"total {total:.0f} s\n")
    (args.out / "fullrank_results.json").write_text(json.dumps(
        {"steps": steps, "rho": args.rho, "r": args.r, "target": args.target, "decay": args.decay, "seconds": total,
         "runs": [{k: v for k, v in r.__dict__.items() if k != "spectra"} for r in results],
         "spectra": {m: best[m].spectra[layer] for m in methods}, "target_spectrum": star_spec[layer].tolist()},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
