"""One layer's adapter work, forward + backward, on sparse (ternary) bases: dense routes vs the sparse route.

For each shape ``(O, I)``, tokens ``T`` and bases mode (``sparse``: density 1/3, ``very_sparse``: 1/√m), times
(median of alternating repetitions, one process) the adapter term alone (``W`` None, ``x``, ``λ``, ``γ`` needing
grad) on the dense activation route and the dense weight route (``ops.randlora_linear``), on the sparse route
(``sparse.sparse_randlora_linear``), and for scale the frozen layer (forward + ``∂x``) and a LoRA r=32 adapter
(forward + backward). Next to the times: each route's cost-model floor (multiply-adds, the sparse one raw and
weighted by ``SPMM_WEIGHT``/``SAMPLED_WEIGHT``), and the measured vs predicted sparse/dense ratio.

    python benchmarks/sparse_op.py                       # 1024², 2816×1024, 1024×2816 × T = 1024, 4096 × both modes
    python benchmarks/sparse_op.py --kernels             # time per multiply-add of the sparse kernels vs a GEMM,
                                                         # and per element of the token-block copies
    python benchmarks/sparse_op.py --routes              # each route of one layer timed against the planner's pick
    python benchmarks/sparse_op.py --builds              # building W + s·ΔW through the non-zeros vs the dense views
    python benchmarks/sparse_op.py --quick               # small shapes, a smoke run
    python benchmarks/sparse_op.py --threads 1           # one thread (steadier on a busy machine)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, median, timed, write_json  # noqa: E402

from randlora import costs, ops, planner, sparse  # noqa: E402
from randlora.bank import BasisBank  # noqa: E402
from randlora.recipes import BankShape  # noqa: E402

SHAPES = [(1024, 1024), (2816, 1024), (1024, 2816)]
TOKENS = [1024, 4096]
MODES = ("sparse", "very_sparse")
VARIANTS = ("activation", "weight", "sparse", "frozen", "lora")


def dense_floor(T, O, I, nr, path):
    p = planner.plan(T, O, I, nr, with_weight=False, path=path)
    return p["forward_cost"] + p["backward_cost"]


def setup(O, I, T, r, mode, seed=0, device="cpu"):
    m, M = min(O, I), max(O, I)
    bank = BasisBank(seed=seed, mode=mode, recipe="portable", shape=BankShape(r=r, M=M, m=m), device=device)
    A, B = bank.views(O, I)
    idx = bank.sparse_index(O, I)
    n = math.ceil(m / r)
    g = torch.Generator().manual_seed(seed)
    lam = (torch.randn(r, n, generator=g) * 1e-2).requires_grad_()
    gam = (torch.randn(n, m, generator=g) / math.sqrt(n)).requires_grad_()
    x = torch.randn(T, I, generator=g).requires_grad_()
    gy = torch.randn(T, O, generator=g)
    W = torch.randn(O, I, generator=g) / math.sqrt(I)
    la = (torch.randn(32, I, generator=g) / math.sqrt(I)).requires_grad_()
    lb = torch.zeros(O, 32).requires_grad_()
    return dict(A=A, B=B, idx=idx, lam=lam, gam=gam, x=x, gy=gy, W=W, la=la, lb=lb, s=2.0)

def step_fn(v, d):
    x, gy, lam, gam, s = d["x"], d["gy"], d["lam"], d["gam"], d["s"]
    if v in ("activation", "weight"):
        return lambda: ops.randlora_linear(x, None, None, lam, gam, d["A"], d["B"], s, v).backward(gy)
    if v == "sparse":
        return lambda: sparse.sparse_randlora_linear(x, None, None, lam, gam, d["idx"], s).backward(gy)
    if v == "frozen":
        return lambda: F.linear(x, d["W"]).backward(gy)
    if v == "lora":
        return lambda: F.linear(F.linear(x, d["la"]), d["lb"]).backward(gy)
    raise ValueError(v)


def bench(O, I, T, r, mode, reps):
    d = setup(O, I, T, r, mode)
    idx = d["idx"]
    nr = idx.n * r
    fns = {v: step_fn(v, d) for v in VARIANTS}
    params = [d["x"], d["lam"], d["gam"], d["la"], d["lb"]]

    def run(v):
        t = timed(fns[v])
        for p in params:
            p.grad = None
        return t

    for v in VARIANTS:
        run(v)
    times = {v: [] for v in VARIANTS}
    for rep in range(reps):
        for v in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1]):
            times[v].append(run(v))
    med = {v: median(ts) for v, ts in times.items()}
    floors = {
        "activation": dense_floor(T, O, I, nr, "activation"),
        "weight": dense_floor(T, O, I, nr, "weight"),
        "sparse_raw": costs.sparse_costs(T, O, I, nr, idx.density_A, idx.density_B, weighted=False, r=r)["total"],
        "sparse": costs.sparse_costs(T, O, I, nr, idx.density_A, idx.density_B, r=r)["total"],
        "frozen": 2 * T * O * I,
        "lora": 3 * T * 32 * (O + I),
    }
    return dict(O=O, I=I, T=T, mode=mode, density_A=idx.density_A, density_B=idx.density_B, J=idx.J, times=times,
                median=med, floors=floors)


@torch.no_grad()
def kernels(O, I, T, r, mode, reps, device="cpu"):
    """Time per multiply-add of the route's sparse products (``S`` and ``B_flat`` by ``embedding_bag`` over
    token blocks; the sampled ``∂S`` by gather + ``bmm``) relative to dense GEMMs of the same sizes: the
    ``spmm_weight`` / ``sampled_weight`` of ``device``'s row of ``randlora.costs.DEVICE_COSTS``."""
    d = setup(O, I, T, r, mode, device=device)
    idx = d["idx"]
    _, s_a, b_val, *_ = idx.operands(torch.float32)
    nr = idx.r * idx.n
    x = torch.randn(T, idx.m, device=device)
    u = torch.randn(T, nr, device=device)
    threads = torch.get_num_threads() if device == "cpu" else 1
    c = planner.sparse_op_route(T, torch.device(device).type, threads).block or T  # the planner's token block
    w = sparse._s_weights(d["lam"].detach().to(device), d["gam"].detach().to(device), idx, s_a, torch.float32)
    B = (idx.b_offs, idx.b_idx, b_val)
    ub = sparse._to_blocks(u, c, torch.float32).clone()  # (its own copy: the route's scratch is reused below)
    S_dense = torch.randn(nr, idx.m, device=device)
    Bd = torch.randn(idx.M, nr, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    xt, ut = x.t().contiguous(), u.t().contiguous()
    xb = sparse._to_blocks(x, c, torch.float32).clone()
    y = torch.randn(T, idx.M, device=device)
    yb = sparse._to_blocks(y, c, torch.float32).clone()
    fns = {
        "S spmm": (lambda: sparse._chain(xb, [sparse._S(idx, w)]), T * idx.n * idx.nnz_A),
        "B spmm": (lambda: sparse._chain(ub, [B]), T * idx.nnz_B),
        "sampled dS": (lambda: sparse._sampled(ub, x, idx, torch.float32), T * nr * idx.J),
        "to blocks": (lambda: sparse._to_blocks(x, c, torch.float32), T * idx.m),
        "from blocks": (lambda: sparse._from_blocks(y, yb, add=True), T * idx.M),
        "GEMM S": (lambda: torch.mm(S_dense, xt), T * nr * idx.m),
        "GEMM B": (lambda: torch.mm(Bd, ut), T * idx.M * nr),
    }
    for f, _ in fns.values():
        f()
    times = {k: [] for k in fns}
    for rep in range(reps):
        for k in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
            times[k].append(timed(fns[k][0], sync))
    per = {k: median(times[k]) / fns[k][1] for k in fns}
    gemm = (per["GEMM S"] + per["GEMM B"]) / 2
    return dict(O=O, I=I, T=T, mode=mode, spmm_S=per["S spmm"] / gemm, spmm_B=per["B spmm"] / gemm,
                sampled=per["sampled dS"] / gemm, layout_in=per["to blocks"] / gemm,
                layout_out=per["from blocks"] / gemm, ms={k: median(v) * 1e3 for k, v in times.items()})


BUILD_SHAPES = [(384, 384), (1536, 384), (384, 1536), (1024, 1024), (2816, 1024), (1024, 2816)]


@torch.no_grad()
def builds(shapes, modes, r, reps):
    """``W + s·ΔW`` built through the bases' dense views (``ops.build_weight``: one ``addmm`` of ``M·n·r·m``
    multiply-adds) and through their non-zeros (``sparse.sparse_delta``), timed alternately: ``build_weight`` of
    ``costs.DEVICE_COSTS`` is the sparse build's time per multiply-add it does (``M·n·r·m·density_B``) against
    the dense build's, i.e. the ratio of the two times over the density."""
    rows = []
    for O, I in shapes:
        for mode in modes:
            d = setup(O, I, 1, r, mode)
            idx, tr = d["idx"], O < I
            lam, gam, W = d["lam"].detach(), d["gam"].detach(), d["W"]
            fns = {"dense": lambda: ops.build_weight(W, lam, gam, d["A"], d["B"], 0.5, tr, torch.float32),
                   "sparse": lambda: sparse.sparse_delta(idx, lam, gam, 0.5, tr, torch.float32, W)}
            err = (fns["dense"]() - fns["sparse"]()).abs().max().item()
            times = {k: [] for k in fns}
            for rep in range(reps):
                for k in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
                    times[k].append(timed(fns[k]))
            t = {k: median(v) for k, v in times.items()}
            ratio = t["sparse"] / t["dense"]
            rows.append([f"{O}×{I}", mode, f"{idx.density_B:.4f}", f"{1e3 * t['dense']:.2f}",
                         f"{1e3 * t['sparse']:.2f}", f"{ratio:.2f}", f"{ratio / idx.density_B:.1f}", f"{err:.1e}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"fp32, r={r}, median of {reps}\n")
    print(markdown_table(["O×I", "bases", "density", "dense views ms", "non-zeros ms", "non-zeros / dense",
                          "build_weight", "max |diff|"], rows))


ROUTE_CELLS = [  # (grad, O, I, T): MiniLM's and the benchmark Llama's widths, no-grad and training calls
    (False, 384, 384, 512), (False, 1536, 384, 512), (False, 2816, 1024, 64), (False, 2816, 1024, 512),
    (False, 2816, 1024, 2048), (False, 1024, 2816, 2048), (True, 1024, 1024, 4096), (True, 1024, 2816, 4096),
    (True, 384, 384, 256), (True, 384, 384, 1024), (True, 1536, 384, 256), (True, 1536, 384, 1024),
    (True, 384, 1536, 256), (True, 384, 1536, 1024)]


def routes(reps, mode="very_sparse"):
    """One adapted layer (``bases=mode``, r = 32, W given) timed on each route its ``path`` can force, no-grad
    forward or a training step (forward + backward, ``x``, ``λ``, ``γ`` needing grad), against the route the
    planner picks (``path="auto"``): the check of the sparse cost's weights (``costs.DEVICE_COSTS``)."""
    import randlora

    rows = []
    for grad, O, I, T in ROUTE_CELLS:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(I, O))
        randlora.inject(model, ["0"], r=32, bases=mode)
        layer = model[0]
        with torch.no_grad():
            layer.randlora_lambda.normal_()
        x = torch.randn(T, I, requires_grad=grad)

        def call():
            with torch.set_grad_enabled(grad):
                y = layer(x)
                if grad:
                    y.sum().backward()
                    layer.randlora_lambda.grad = layer.randlora_gamma.grad = x.grad = None

        t = {}
        for path in ("sparse", "weight", "activation", "auto"):
            layer.set_path(path)
            call()
            t[path] = median([timed(call) for _ in range(reps)])
        layer.set_path("auto")
        with torch.set_grad_enabled(grad):
            picked = layer.route(T, need_x=grad)
        best = min(("sparse", "weight", "activation"), key=t.__getitem__)
        rows.append(["training step" if grad else "no-grad forward", f"{O}×{I}", T]
                    + [f"{1e3 * t[p]:.2f}" for p in ("sparse", "weight", "activation", "auto")]
                    + [best, f"{picked.kind}/{picked.forward}", f"{t['auto'] / t[best]:.2f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print(markdown_table(["call", "O×I", "T", "sparse ms", "weight ms", "activation ms", "auto ms", "fastest",
                          "planner's route", "auto / fastest"], rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="measure the spmm / sampled weights (costs.DEVICE_COSTS) instead")
    ap.add_argument("--routes", action="store_true", help="time each route of one layer against the planner's pick")
    ap.add_argument("--builds", action="store_true",
                    help="time W + s·ΔW built through the bases' non-zeros against their dense views")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    ap.add_argument("--shapes", nargs="*", default=None, help="OxI, e.g. 2816x1024")
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="--kernels only: the device whose weights are measured")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    tokens = args.tokens
    if args.quick:
        shapes, tokens, args.reps, args.r = [(96, 64), (64, 96)], [16, 128], 1, 8
    info = machine()
    if args.routes:
        return routes(args.reps)
    if args.builds:
        return builds([tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else BUILD_SHAPES,
                      args.modes, args.r, args.reps)
    if args.kernels:
        rows = []
        for O, I in shapes:
            for T in tokens:
                for mode in args.modes:
                    k = kernels(O, I, T, args.r, mode, args.reps, args.device)
                    rows.append([f"{O}×{I}", T, mode, f"{k['spmm_S']:.2f}", f"{k['spmm_B']:.2f}",
                                 f"{k['sampled']:.2f}", f"{k['layout_in']:.0f}", f"{k['layout_out']:.0f}"]
                                + [f"{v:.2f}" for v in k["ms"].values()])
                    print(" | ".join(str(c) for c in rows[-1]), flush=True)
        print(f"\nmachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
              f"({info['torch_threads']} threads), {args.device}, fp32, r={args.r}; time per multiply-add relative "
              "to a GEMM's\n")
        print(markdown_table(["O×I", "T", "bases", "S spmm / GEMM", "B spmm / GEMM", "sampled ∂S / GEMM",
                              "input to blocks / GEMM", "blocks added to output / GEMM", "S spmm ms", "B spmm ms",
                              "sampled ∂S ms", "to blocks ms", "from blocks ms", "GEMM S ms", "GEMM B ms"], rows))
        return
    rows, res = [], []
    for O, I in shapes:
        for T in tokens:
            for mode in args.modes:
                b = bench(O, I, T, args.r, mode, args.reps)
                res.append(b)
                m, f = b["median"], b["floors"]
                act = m["activation"]
                rows.append([
                    f"{O}×{I}", T, f"{mode} ({b['density_B']:.3f})",
                    f"{act * 1e3:.1f}", f"{m['weight'] * 1e3:.1f}", f"{m['sparse'] * 1e3:.1f}",
                    f"{m['frozen'] * 1e3:.1f}", f"{m['lora'] * 1e3:.1f}",
                    f"{m['sparse'] / act:.2f}", f"{f['sparse_raw'] / f['activation']:.2f}",
                    f"{f['sparse'] / f['activation']:.2f}",
                    f"{m['weight'] / act:.2f}", f"{f['weight'] / f['activation']:.2f}",
                    f"{m['sparse'] / m['frozen']:.2f}",
                ])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    headers = ["O×I", "T", "bases (density)", "dense act ms", "dense weight ms", "sparse ms", "frozen fwd+∂x ms",
               "LoRA r=32 ms", "sparse/act measured", "floor raw", "floor weighted", "weight/act measured",
               "floor", "sparse/frozen"]
    text = markdown_table(headers, rows)
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"fp32, r={args.r}, {args.reps} alternating reps; adapter work only (W None), forward + backward\n")
    print(text)
    path = write_json("sparse_op-quick.json" if args.quick else "sparse_op.json",
                      dict(machine=info, args=vars(args), rows=res, table=text), args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
