"""Training-step benchmark on a mixture-of-experts model: this library on attention projections and expert tensors
vs peft LoRA on the same targets and full fine-tuning.

Model: ``transformers.MixtralConfig`` (8 experts, top-2, hidden 512, intermediate 1024, 4 layers, 8 heads,
vocab 4096), random weights, fp32, batch 4 × 256 = 1,024 tokens per step; one step = forward, backward, AdamW.
Every configuration runs in its own subprocess (peak memory = that process's ``ru_maxrss``), repeated in
alternating order; the table shows medians and the ratios against peft LoRA and full fine-tuning of the same run.

Kinds:

- ``randlora``: ``q/k/v/o_proj`` plus the expert tensors ``gate_up_proj`` and ``down_proj``, dense bases, ``r=32``;
- ``randlora-vs``: the same with ``bases="very_sparse"``;
- ``randlora-attn``: the attention projections only;
- ``peft-lora``: peft LoRA on the same attention modules (``target_modules``) and expert tensors
  (``target_parameters``), its rank chosen so that its trainable count is the closest to ``randlora``'s
  (both counts are printed; ``--lora-r`` overrides);
- ``full``: full fine-tuning.

    python benchmarks/moe_step.py                       # the full run (CPU, 2 cores: roughly 10-20 min)
    python benchmarks/moe_step.py --quick               # a tiny model, one repetition: a smoke run
    python benchmarks/moe_step.py --experts-impl eager --kinds randlora peft-lora full
    python benchmarks/moe_step.py --eval                # no-grad forward: base, unmerged, inside randlora.cached

``--eval`` times a no-grad forward of the same batch in one process, interleaved: the base model; RandLora
(attention + expert tensors, random ``λ``/``γ``) unmerged, where every call builds each expert's ``W + s·ΔW``;
inside ``randlora.cached(model)`` (each tensor's ``s·ΔW`` kept, ``W + s·ΔW`` formed per call); inside
``randlora.cached(model, frozen_base=True)`` (``W + s·ΔW`` kept); and merged.

Needs ``pip install -e ".[bench]"`` (peft, transformers).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (have, interleaved, lm_train_step, machine, markdown_table, median, peak_rss_mb,  # noqa: E402
                     run_worker, timed, write_json)

KINDS = ("randlora", "randlora-vs", "randlora-attn", "peft-lora", "full")
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["gate_up_proj", "down_proj"]
BATCH = 4
SIZE = dict(hidden=512, inter=1024, layers=4, heads=8, vocab=4096, experts=8, top_k=2, seq=256)
QUICK = dict(hidden=64, inter=128, layers=2, heads=4, vocab=256, experts=4, top_k=2, seq=32)
IMPLS = ("eager", "batched_mm", "grouped_mm")


# ------------------------------------------------------------------------------------------------
# worker (one configuration, one process)
# ------------------------------------------------------------------------------------------------
def build_model(size, impl=None):
    """A random-weight ``MixtralForCausalLM`` of ``size`` (fp32); ``impl`` sets ``config._experts_implementation``
    (None: the model's default)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    conf = MixtralConfig(hidden_size=size["hidden"], intermediate_size=size["inter"],
                         num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["heads"], vocab_size=size["vocab"],
                         num_local_experts=size["experts"], num_experts_per_tok=size["top_k"],
                         max_position_embeddings=max(1024, size["seq"]))
    torch.manual_seed(0)
    model = MixtralForCausalLM(conf)
    if impl:
        model.config._experts_implementation = impl
    return model


def adapt(model, kind, r, lora_r):
    """``model`` adapted as ``kind`` describes, and its trainable parameters."""
    if kind in ("randlora", "randlora-vs", "randlora-attn"):
        import randlora

        extra = {} if kind == "randlora-attn" else {"target_parameters": EXPERTS}
        bases = "very_sparse" if kind == "randlora-vs" else "dense"
        report = randlora.inject(model, ATTN, r=r, alpha=640.0, bases=bases, **extra)
        if len(report.experts) != (0 if kind == "randlora-attn" else len(EXPERTS) * model.config.num_hidden_layers):
            raise RuntimeError(f"{kind}: unexpected expert tensors adapted: {sorted(report.experts)}")
        return model, list(randlora.trainable_parameters(model))
    if kind == "peft-lora":
        from peft import LoraConfig, get_peft_model

        conf = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=ATTN, target_parameters=EXPERTS)
        model = get_peft_model(model, conf)
    elif kind != "full":
        raise ValueError(kind)
    return model, [p for p in model.parameters() if p.requires_grad]


def trainable_counts(size, r):
    """Trainable values of ``randlora`` at ``r`` and of ``peft-lora`` at rank 1 (its count is linear in the rank)."""
    counts = {}
    for kind, rank in (("randlora", r), ("peft-lora", 1)):
        _, params = adapt(build_model(size), kind, r, rank)
        counts[kind] = sum(p.numel() for p in params)
    return counts


def measure(cfg):
    """One configuration's step times (after one warm-up step), peak RSS and trainable count, in this process."""
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    size = cfg["size"]
    model, params = adapt(build_model(size, cfg.get("impl")), cfg["kind"], cfg["r"], cfg["lora_r"])
    torch.manual_seed(0)
    ids = torch.randint(0, size["vocab"], (BATCH, size["seq"]))
    gc.collect()
    setup_mb = peak_rss_mb()
    step = lm_train_step(model, ids, params)

    times, cpu = [], []
    for i in range(1 + cfg["steps"]):  # one warm-up step
        c = time.process_time()
        t = timed(step)
        if i:
            times.append(t)
            cpu.append(time.process_time() - c)
    return {"time_s": median(times), "times": times, "cpu_s": median(cpu), "peak_mb": peak_rss_mb(),
            "setup_mb": setup_mb, "trainable": sum(p.numel() for p in params),
            "impl": model.config._experts_implementation}


def eval_forward(size, args):
    """``--eval``: median seconds of a no-grad forward per variant (interleaved, one process; each variant its own
    copy of the model, a cached one inside its block for the whole run, as an evaluation loop would be)."""
    import contextlib
    import copy

    import torch

    import randlora

    if args.threads:
        torch.set_num_threads(args.threads)
    base = build_model(size, args.experts_impl).eval()
    model, _ = adapt(copy.deepcopy(base), "randlora", args.r, None)
    with torch.no_grad():
        for p in randlora.trainable_parameters(model):
            p.normal_(0, 0.02)
    ids = torch.randint(0, size["vocab"], (BATCH, size["seq"]), generator=torch.Generator().manual_seed(0))
    merged = copy.deepcopy(model)
    randlora.merge(merged)
    variants = {"base": base, "unmerged": model, "cached": copy.deepcopy(model),
                "cached frozen_base": copy.deepcopy(model), "merged": merged}
    with contextlib.ExitStack() as stack, torch.no_grad():
        stack.enter_context(randlora.cached(variants["cached"]))
        stack.enter_context(randlora.cached(variants["cached frozen_base"], frozen_base=True))
        want = model(ids).logits
        for name in ("cached", "cached frozen_base", "merged"):  # the same model, within float error
            torch.testing.assert_close(variants[name](ids).logits, want, rtol=1e-3, atol=1e-3)
        times = interleaved(list(variants), lambda name: variants[name](ids), rounds=2 * args.reps, warmup=1)
    base_t = median(times["base"])
    rows = [[k, f"{median(v) * 1e3:.0f} ms", f"{median(v) / base_t:.2f}×"] for k, v in times.items()]
    return markdown_table(["variant", "no-grad forward", "/ base"], rows)


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def summarize(rows):
    """A markdown table: medians over the repetitions, ratios against peft LoRA and full fine-tuning."""
    S = {}
    for row in rows:
        rs = row["reps"]
        for key in ("time_s", "cpu_s", "peak_mb", "setup_mb"):
            row[key] = median([r[key] for r in rs])
        row["trainable"] = rs[0]["trainable"]
        S[row["kind"]] = row

    def ratio(a, b, k):
        return f"{a[k] / b[k]:.2f}×" if b is not None else "—"

    lora, full = S.get("peft-lora"), S.get("full")
    table = [[k, f"{me['trainable']:,}", f"{me['time_s']:.2f} s", f"{me['cpu_s']:.2f} s", f"{me['peak_mb']:.0f} MB",
              f"{me['setup_mb']:.0f} MB", ratio(me, lora, "time_s"), ratio(me, lora, "peak_mb"),
              ratio(me, full, "time_s"), ratio(me, full, "peak_mb")]
             for k, me in S.items()]
    return markdown_table(["run", "trainable", "step time", "step CPU time", "peak RSS", "RSS before step",
                           "time / peft LoRA", "mem / peft LoRA", "time / full FT", "mem / full FT"], table)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 repetition, 1 step: a smoke run")
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    ap.add_argument("--experts-impl", default=None, choices=IMPLS,
                    help="config._experts_implementation (default: the model's own choice for the CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions (processes) per configuration")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per process, after one warm-up step")
    ap.add_argument("--r", type=int, default=32, help="this library's rank")
    ap.add_argument("--lora-r", type=int, default=None, help="peft LoRA's rank (default: the closest count)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/out/moe_step[-quick].json)")
    ap.add_argument("--from-json", default=None, help="re-print the table of an earlier run's JSON")
    ap.add_argument("--eval", action="store_true", help="time a no-grad forward instead of a training step")
    return ap.parse_args(argv)


def pick_lora_rank(size, args):
    """peft LoRA's rank: ``--lora-r``, or the one whose trainable count is the closest to ``randlora``'s."""
    counts = trainable_counts(size, args.r)
    lora_r = args.lora_r or max(1, round(counts["randlora"] / counts["peft-lora"]))
    print(f"trainable values: randlora (r={args.r}) {counts['randlora']:,}; "
          f"peft LoRA (r={lora_r}) {counts['peft-lora'] * lora_r:,}", flush=True)
    return lora_r, counts


def main(argv=None):
    args = parse(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return None
    if args.from_json:
        print(json.loads(Path(args.from_json).read_text())["table"])
        return None
    if have("transformers", "peft"):
        sys.exit("this benchmark needs transformers and peft: pip install -e '.[bench]'")
    size = dict(QUICK if args.quick else SIZE)
    if args.quick:
        args.reps, args.steps = 1, 1
    if args.eval:
        print(eval_forward(size, args))
        return None
    lora_r, counts = pick_lora_rank(size, args)
    kinds = list(dict.fromkeys(args.kinds))
    results = {k: [] for k in kinds}
    script = str(Path(__file__).resolve())
    for rep in range(args.reps):
        order = kinds[::-1] if rep % 2 else kinds  # alternate the order so drift hits every configuration alike
        for k in order:
            cfg = dict(kind=k, size=size, r=args.r, lora_r=lora_r, impl=args.experts_impl, steps=args.steps,
                       threads=args.threads)
            res = run_worker(script, cfg)
            results[k].append(res)
            print(f"rep {rep + 1}/{args.reps} {k:>13}: {res['time_s']:.3f} s, {res['peak_mb']:.0f} MB", flush=True)
    rows = [dict(kind=k, reps=results[k]) for k in kinds]
    text = summarize(rows)
    info = machine()
    impl = rows[0]["reps"][0]["impl"]
    threads = args.threads or info["torch_threads"]
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({threads} threads); "
          f"Mixtral {size}, experts_implementation {impl}, fp32, r={args.r}, peft LoRA r={lora_r}, batch {BATCH}, "
          f"{args.reps} alternating reps × {args.steps} steps\n")
    print(text)
    path = write_json("moe_step-quick.json" if args.quick else "moe_step.json",
                      dict(machine=info, args=vars(args), size=size, impl=impl, lora_r=lora_r, counts=counts,
                           rows=rows, table=text), args.out)
    print(f"\nwrote {path}")
    return None


if __name__ == "__main__":
    main()
