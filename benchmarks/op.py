"""One adapted layer, forward + backward, against the frozen layer alone.

For each shape ``(O, I)`` and tokens per call ``T``, times (median of alternating repetitions, in one
process) the frozen ``nn.Linear`` (forward and input gradient), and this library's layer with the
cost model's choice (``auto``), forced ``weight`` and forced ``activation`` (peft's way) routes.
Prints the route ``auto`` picks and the cost-model floor: ``(base + extra multiply-adds) / base``.

    python benchmarks/op.py                  # 1024², 2816×1024, 1024×2816, 4096² × T = 256 … 8192
    python benchmarks/op.py --quick          # small shapes, a smoke run
    python benchmarks/op.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, median, timed, write_json  # noqa: E402

import randlora  # noqa: E402
from randlora.planner import plan, plan_call  # noqa: E402

SHAPES = [(1024, 1024), (2816, 1024), (1024, 2816), (4096, 4096)]
TOKENS = [256, 1024, 4096, 8192]
VARIANTS = ("base", "auto", "weight", "activation")


def make_layer(O, I, r, dtype, device="cpu"):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(I, O, bias=False)).to(device, dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    model = nn.Sequential(nn.Linear(I, O, bias=False)).to(device, dtype)
    model.load_state_dict(base.state_dict())
    randlora.inject(model, ["0"], r=r)
    with torch.no_grad():
        model[0].randlora_lambda.normal_(0, 1e-3)
    return base[0], model[0]


def step(layer, x, gy):
    y = layer(x)
    y.backward(gy)


def bench(O, I, T, r, reps, dtype, variants, max_gmac, device="cpu"):
    base, layer = make_layer(O, I, r, dtype, device)
    x = torch.randn(T, I, dtype=dtype, device=device, requires_grad=True)
    gy = torch.randn(T, O, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    nr = layer.n * r
    p = plan(T, O, I, nr)
    keep = plan_call(T=T, O=O, I=I, nr=nr, r=r).build is not None
    pk = plan(T, O, I, nr, kept=True) if keep else p
    extra = (max(O, I) * nr * min(O, I) + pk["backward_cost"]) if keep else (p["forward_cost"] + p["backward_cost"])
    floor = (p["base_cost"] + extra) / p["base_cost"]
    act = plan(T, O, I, nr, path="activation")
    act_floor = (act["base_cost"] + act["forward_cost"] + act["backward_cost"]) / act["base_cost"]
    todo = [v for v in variants if not (v == "activation" and act["base_cost"] * act_floor / 1e9 > max_gmac)]

    def run(v):
        if v == "base":
            return timed(lambda: step(base, x, gy), sync)
        layer.set_path(v)
        return timed(lambda: step(layer, x, gy), sync)

    for v in todo:  # warm-up
        run(v)
    times = {v: [] for v in todo}
    for rep in range(reps):
        for v in (todo if rep % 2 == 0 else todo[::-1]):
            times[v].append(run(v))
    med = {v: median(ts) for v, ts in times.items()}
    route = f"{'kept' if keep else p['forward']} / {'+'.join(str(b) for b in (pk if keep else p)['backward'])}"
    return dict(O=O, I=I, T=T, route=route, keep=keep, floor=floor, act_floor=act_floor, times=times, median=med)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    ap.add_argument("--shapes", nargs="*", default=None, help="OxI, e.g. 2816x1024")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--max-gmac", type=float, default=400.0,
                    help="skip the activation route where its multiply-adds exceed this (GMAC)")
    ap.add_argument("--max-base-gmac", type=float, default=float("inf"),
                    help="skip shapes × T whose frozen layer alone exceeds this (GMAC, forward + input grad)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    tokens = args.tokens
    if args.quick:
        shapes, tokens, args.reps, args.r = ([(96, 64), (64, 96)] if not args.shapes else shapes), [16, 128], 1, 8
    rows, res = [], []
    for O, I in shapes:
        for T in tokens:
            if 2 * T * O * I / 1e9 > args.max_base_gmac:
                print(f"{O}×{I} T={T}: skipped (--max-base-gmac)")
                continue
            b = bench(O, I, T, args.r, args.reps, dtype, VARIANTS, args.max_gmac, args.device)
            res.append(b)
            m = b["median"]
            rows.append([f"{O}×{I}", T, b["route"], f"{m['base'] * 1e3:.1f} ms",
                         f"{m['auto'] / m['base']:.2f}×", f"{b['floor']:.2f}×",
                         f"{m['weight'] / m['base']:.2f}×",
                         f"{m['activation'] / m['base']:.2f}×" if "activation" in m else "skipped",
                         f"{b['act_floor']:.2f}×"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    headers = ["O×I", "T", "auto route (fwd / ∂x+∂S)", "frozen layer", "auto", "auto floor", "weight",
               "activation (peft-like)", "activation floor"]
    text = markdown_table(headers, rows)
    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"{args.device}, {args.dtype}, r={args.r}, {args.reps} alternating reps; times are forward+backward relative to the "
          "frozen layer\n")
    print(text)
    path = write_json("op-quick.json" if args.quick else "op.json", dict(machine=info, args=vars(args), rows=res,
                                                                           table=text), args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
