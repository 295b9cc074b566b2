"""What ``randlora.cached`` costs and saves on one layer: the value check, forming ``W + s·ΔW``, a rebuild.

For each layer shape (r = 32, fp32, no grad), medians over alternating repetitions of:

- ``check``: comparing the layer's ``λ`` and ``γ`` with the cached copies (done on every call inside ``cached``);
- ``W + D``: forming the weight from the current ``W`` and the cached ``s·ΔW`` (done on every hit);
- ``build``: computing ``s·ΔW`` (a miss);
- the layer's no-grad forward at ``T`` tokens: plain ``nn.Linear``, adapted without the cache, adapted
  inside ``cached`` (hits).

    python benchmarks/cache.py                  # 1024×1024 and 2816×1024, T = 1024
    python benchmarks/cache.py --tokens 1 256 1024 --reps 7
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, median  # noqa: E402

import randlora  # noqa: E402
from randlora.ops import delta_weight  # noqa: E402


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return median(out)


def measure(O: int, I: int, T: int, r: int, reps: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(I, O))
    randlora.inject(model, ["0"], r=r)
    layer = model[0]
    with torch.no_grad():
        layer.randlora_lambda.normal_(0, 1e-2)
        layer.randlora_gamma.uniform_(0.5, 1.5)
    plain = nn.Linear(I, O)
    x = torch.randn(T, I)
    lam, gam = layer.randlora_lambda, layer.randlora_gamma
    lam0, gam0 = lam.detach().clone(), gam.detach().clone()
    A, B = layer.views()
    D = delta_weight(lam.detach(), gam.detach(), A, B, layer.scaling, O < I, torch.float32)
    W = layer.weight
    res = {}
    with torch.no_grad():
        res["check"] = _time(lambda: torch.equal(lam, lam0) and torch.equal(gam, gam0), reps * 20)
        res["W + D"] = _time(lambda: W + D, reps)
        res["build"] = _time(lambda: delta_weight(lam, gam, A, B, layer.scaling, O < I, torch.float32), reps)
        fwd = {"plain": lambda: plain(x), "adapted": lambda: model(x)}
        with randlora.cached(model):
            model(x)  # first call builds
            fwd["cached"] = lambda: model(x)
            order = list(fwd)
            times = {k: [] for k in order}
            for rep in range(reps):
                for k in (order if rep % 2 == 0 else order[::-1]):
                    times[k].append(_time(fwd[k], 1))
        res.update({k: median(v) for k, v in times.items()})
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["1024x1024", "2816x1024"], help="OxI")
    ap.add_argument("--tokens", nargs="*", type=int, default=[1024])
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    rows = []
    for shape in args.shapes:
        O, I = (int(v) for v in shape.split("x"))
        for T in args.tokens:
            m = measure(O, I, T, args.r, args.reps)
            ms = lambda v: f"{v * 1e3:.3f} ms"  # noqa: E731
            rows.append([f"{O}×{I}", T, ms(m["check"]), ms(m["W + D"]), ms(m["build"]), ms(m["plain"]),
                         ms(m["adapted"]), ms(m["cached"]), f"{m['adapted'] / m['plain']:.2f}×",
                         f"{m['cached'] / m['plain']:.2f}×", f"{m['check'] / m['plain'] * 100:.2f} %"])
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"r={args.r}, fp32, no grad, medians of {args.reps} alternating repetitions\n")
    print(markdown_table(["layer", "T", "value check", "W + D", "build s·ΔW", "plain fwd", "adapted fwd",
                          "adapted fwd, cached", "adapted / plain", "cached / plain", "check / plain fwd"], rows))


if __name__ == "__main__":
    main()
