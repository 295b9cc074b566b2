"""Training-step benchmark: this library vs peft RandLora, peft LoRA and full fine-tuning.

Model: ``transformers.LlamaConfig`` (hidden 1024, MLP 2816, 4 layers, 16 heads, vocab 4096), random
weights, batch 4; one step = forward, backward, AdamW. Every configuration runs in its own subprocess
(peak memory = that process's ``ru_maxrss``; on CUDA ``torch.cuda.max_memory_allocated``), repeated in
alternating order; the table shows medians and the ratios against peft and full fine-tuning from the same run.
Also times the unmerged ``eval()`` forward against the plain model's forward.

    python benchmarks/step.py                 # the full grid (CPU: about 30 min on 2 cores)
    python benchmarks/step.py --quick         # a small model, one repetition: a smoke run
    python benchmarks/step.py --device cuda --dtype bf16 --grid all:4096 all:8192
    python benchmarks/step.py --sparse --no-eval --grid all:1024 all:4096 --kinds randlora randlora-vs peft-lora

``randlora-vs`` uses ``bases="very_sparse"`` (its layers take the sparse route when the cost model says it pays);
``--sparse`` adds it to the default kinds.

Needs ``pip install -e ".[bench]"`` (peft, transformers); without peft only full fine-tuning is compared.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (have, lm_train_step, machine, markdown_table, median, peak_rss_mb, run_worker, timed,  # noqa: E402
                     write_json)

TARGETS = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}
TARGET_LABEL = {"qv": "q_proj,v_proj", "all": "all 7 linear"}
TRAIN_KINDS = ("randlora", "randlora-keep", "randlora-vs", "peft-randlora", "peft-lora", "full")
SPARSE_KINDS = ("randlora-vs",)
EVAL_KINDS = ("eval-plain", "eval-randlora", "eval-randlora-cached")
BATCH = 4


# ------------------------------------------------------------------------------------------------
# worker (one configuration, one process)
# ------------------------------------------------------------------------------------------------
def build_model(cfg):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    size = cfg["size"]
    conf = LlamaConfig(hidden_size=size["hidden"], intermediate_size=size["mlp"], num_hidden_layers=size["layers"],
                       num_attention_heads=size["heads"], num_key_value_heads=size["heads"],
                       vocab_size=size["vocab"], max_position_embeddings=max(2048, cfg["seq"]))
    torch.manual_seed(0)
    model = LlamaForCausalLM(conf)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["dtype"]]
    return model.to(device=cfg["device"], dtype=dtype)


def adapt(model, cfg):
    import torch

    kind, targets, r = cfg["kind"], TARGETS[cfg["targets"]], cfg["r"]
    if kind in ("randlora", "randlora-keep", "eval-randlora", "eval-randlora-cached", *SPARSE_KINDS):
        import randlora

        bases = "very_sparse" if kind in SPARSE_KINDS else "dense"
        randlora.inject(model, targets, r=r, alpha=640.0, bases=bases)
        if kind == "randlora-keep":
            cfg = dict(cfg, keep="always")
        if cfg.get("keep"):
            for m in model.modules():
                if isinstance(m, randlora.RandLoraLinear):
                    m.set_keep(cfg["keep"])
        if kind.startswith("eval-randlora"):
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, randlora.RandLoraLinear):
                        m.randlora_lambda.normal_(0, 1e-3)
        return model, list(randlora.trainable_parameters(model))
    if kind == "peft-randlora":
        from peft import RandLoraConfig, get_peft_model

        model = get_peft_model(model, RandLoraConfig(r=r, target_modules=targets, randlora_alpha=640))
    elif kind == "peft-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    elif kind in ("full", "eval-plain"):
        pass
    else:
        raise ValueError(kind)
    return model, [p for p in model.parameters() if p.requires_grad]


def worker(cfg):
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    dev = torch.device(cfg["device"])
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    model, params = adapt(build_model(cfg), cfg)
    ids = torch.randint(0, cfg["size"]["vocab"], (BATCH, cfg["seq"]), device=dev)
    gc.collect()
    setup_mb = peak_rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    if cfg["kind"].startswith("eval"):
        import contextlib

        model.eval()

        def fwd():
            with torch.no_grad():
                model(ids)

        if cfg["kind"] == "eval-randlora-cached":
            import randlora

            ctx = randlora.cached(model)  # s·ΔW kept between calls, checked against λ/γ on every call
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            for i in range(1 + max(cfg["steps"], 5)):  # a forward is cheap: take at least 5 after the warm-up
                c = time.process_time()
                t = timed(fwd, sync)
                if i:
                    times.append(t)
                    cpu.append(time.process_time() - c)
    else:
        step = lm_train_step(model, ids, params)

        for i in range(1 + cfg["steps"]):  # one warm-up step
            c = time.process_time()
            t = timed(step, sync)
            if i:
                times.append(t)
                cpu.append(time.process_time() - c)
    out = {"time_s": median(times), "times": times, "cpu_s": median(cpu), "peak_mb": peak_rss_mb(), "setup_mb": setup_mb,
           "trainable": sum(p.numel() for p in params)}
    if dev.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def _med(rs, key):
    vals = [r[key] for r in rs if key in r]
    return median(vals) if vals else float("nan")


def summarize(rows, no_eval=False):
    """Markdown tables (medians over the repetitions; ratios against peft and full fine-tuning of the same run)."""
    S = {}
    for row in rows:
        rs = row["reps"]
        v = dict(t=_med(rs, "time_s"), cpu=_med(rs, "cpu_s"), mem=_med(rs, "peak_mb"), setup=_med(rs, "setup_mb"))
        row.update(time_s=v["t"], cpu_s=v["cpu"], peak_mb=v["mem"], setup_mb=v["setup"])
        tgs = TARGETS if row["kind"] in ("full", "eval-plain") else [row["targets"]]
        for tg in tgs:
            S[(row["kind"], tg, row["tokens"])] = v

    def ratio(a, b, k):
        return f"{a[k] / b[k]:.2f}×" if (a and b and a[k] == a[k] and b[k] == b[k]) else "—"

    table, seen = [], []
    for row in rows:
        if row["kind"].startswith("eval"):
            continue
        g = (row["targets"], row["tokens"])
        if g not in seen:
            seen.append(g)
    kinds = [k for k in TRAIN_KINDS]
    for tg, tok in seen:
        peer, lora, full = (S.get((k, tg, tok)) for k in ("peft-randlora", "peft-lora", "full"))
        for k in kinds:
            me = S.get((k, tg, tok))
            if me is None:
                continue
            table.append([TARGET_LABEL[tg], tok, k, f"{me['t']:.2f} s", f"{me['cpu']:.2f} s", f"{me['mem']:.0f} MB",
                          f"{me['setup']:.0f} MB", ratio(me, peer, "t"), ratio(me, peer, "cpu"),
                          ratio(me, lora, "mem"), ratio(me, lora, "t"), ratio(me, full, "t")])
    headers = ["targets", "tokens/step", "run", "step time", "step CPU time", "peak RSS", "RSS before step",
               "time / peft RandLora", "CPU / peft RandLora", "mem / peft LoRA", "time / peft LoRA",
               "time / full FT"]
    text = markdown_table(headers, table)
    ev = [row for row in rows if row["kind"] == "eval-randlora"]
    if ev and not no_eval:
        tok = ev[0]["tokens"]
        plain = S[("eval-plain", "all", tok)]
        rows_ev = [["plain model", tok, f"{plain['t'] * 1e3:.0f} ms", f"{plain['cpu'] * 1e3:.0f} ms",
                    f"{plain['mem']:.0f} MB", "1.00×", "1.00×"]]
        for kind, label in (("eval-randlora", "randlora, unmerged"),
                            ("eval-randlora-cached", "randlora, unmerged, inside cached()")):
            mine = S.get((kind, "all", tok))
            if mine is not None:
                rows_ev.append([label, tok, f"{mine['t'] * 1e3:.0f} ms", f"{mine['cpu'] * 1e3:.0f} ms",
                                f"{mine['mem']:.0f} MB", ratio(mine, plain, "t"), ratio(mine, plain, "cpu")])
        text += "\n\n" + markdown_table(
            ["eval() forward, all 7 linear", "tokens", "time", "CPU time", "peak RSS", "time / plain", "CPU / plain"],
            rows_ev)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 repetition, 1 step: a smoke run")
    ap.add_argument("--grid", nargs="*", default=None,
                    help="targets:tokens pairs (default: all:1024 all:4096 qv:1024)")
    ap.add_argument("--kinds", nargs="*", default=None)
    ap.add_argument("--sparse", action="store_true", help="include the very_sparse kind in the default kinds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions (processes) per configuration")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per process, after one warm-up step")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--keep", default=None, choices=["auto", "always", "never"], help="this library's keep policy")
    ap.add_argument("--no-eval", action="store_true", help="skip the eval() forward comparison")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/out/step[-quick].json)")
    ap.add_argument("--from-json", default=None, help="re-print the tables of an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        print(summarize(data["rows"], data["args"].get("no_eval", False)))
        return None

    size = dict(hidden=1024, mlp=2816, layers=4, heads=16, vocab=4096)
    grid = args.grid or ["all:1024", "all:4096", "qv:1024"]
    if args.quick:
        size = dict(hidden=128, mlp=352, layers=2, heads=4, vocab=512)
        grid = args.grid or ["all:256"]
        args.reps, args.steps = 1, 1
    missing = have("transformers")
    if missing:
        sys.exit("this benchmark needs transformers (and peft for the peft rows): pip install -e '.[bench]'")
    kinds = list(args.kinds) if args.kinds else [k for k in TRAIN_KINDS if args.sparse or k not in SPARSE_KINDS]
    if have("peft"):
        print("peft is not installed: comparing against full fine-tuning only (pip install -e '.[bench]')")
        kinds = [k for k in kinds if not k.startswith("peft")]

    jobs = []
    for g in grid:
        tg, tok = g.split(":")
        for k in kinds:
            if k == "full" and any(j["kind"] == "full" and j["tokens"] == int(tok) for j in jobs):
                continue  # full fine-tuning does not depend on the targets: run it once per token count
            if k == "randlora-keep" and tg != "all":
                continue  # the keep trade-off is shown on the all-linear rows only
            jobs.append(dict(kind=k, targets=tg, tokens=int(tok)))
    if not args.no_eval:
        for k in EVAL_KINDS:
            jobs.append(dict(kind=k, targets="all", tokens=int(grid[0].split(":")[1]), eval=True))
    results = {i: [] for i in range(len(jobs))}
    script = str(Path(__file__).resolve())
    for rep in range(args.reps):
        order = list(range(len(jobs)))
        if rep % 2:
            order.reverse()  # alternate the order so drift and neighbours hit every configuration alike
        for i in order:
            j = jobs[i]
            cfg = dict(kind=j["kind"], targets=j["targets"], seq=j["tokens"] // BATCH, r=args.r, size=size,
                       device=args.device, dtype=args.dtype, steps=args.steps, keep=args.keep,
                       threads=args.threads)
            res = run_worker(script, cfg)
            results[i].append(res)
            print(f"rep {rep + 1}/{args.reps} {j['kind']:>13} {j['targets']:>3} {j['tokens']:>5} tok: "
                  f"{res['time_s']:.3f} s, {res['peak_mb']:.0f} MB", flush=True)

    rows = [dict(j, reps=results[i]) for i, j in enumerate(jobs)]
    text = summarize(rows, args.no_eval)
    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"{args.device}, {args.dtype}, r={args.r}, batch {BATCH}, {args.reps} alternating reps × {args.steps} steps\n")
    print(text)
    path = write_json("step-quick.json" if args.quick else "step.json",
                      dict(machine=info, args=vars(args), size=size, rows=rows, table=text), args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
