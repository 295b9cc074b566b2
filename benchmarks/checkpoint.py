"""Adapter file sizes (ours and peft's, both save_projection settings) and bank generation time.

Model: the Llama benchmark model of the performance issue (transformers LlamaConfig hidden 1024,
intermediate 2816, 4 layers, 16 heads, vocab 4096, random weights), r=32, targets all seven linear
layers and q_proj,v_proj. Bank generation: the Llama-7B-sized all-linear bank (M_g=11008, m_g=4096, r=32).

    python benchmarks/checkpoint.py [--skip-peft] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import randlora
from randlora.recipes import MODES, BankShape, generate

TARGETS = {
    "all 7 linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "q_proj,v_proj": ["q_proj", "v_proj"],
}


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                      vocab_size=4096)
    return LlamaForCausalLM(cfg)


def size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def file_sizes(skip_peft: bool) -> list[dict]:
    rows = []
    base_state = llama().state_dict()
    for label, targets in TARGETS.items():
        for recipe in ("portable", "peft"):
            model = llama()
            model.load_state_dict(base_state)
            randlora.inject(model, targets, r=32, recipe=recipe)
            params = sum(p.numel() for p in randlora.trainable_parameters(model))
            with tempfile.TemporaryDirectory() as d:
                for sp in (True, False):
                    p = randlora.save(model, Path(d) / f"a_{sp}.safetensors", save_projection=sp)
                    rows.append({"targets": label, "writer": f"randlora.save (recipe={recipe})",
                                 "save_projection": sp, "params": params, "bytes": size(p)})
                    if recipe == "peft" or sp:
                        f = randlora.save_peft(model, Path(d) / f"p_{sp}", save_projection=sp)
                        rows.append({"targets": label, "writer": f"randlora.save_peft (recipe={recipe})",
                                     "save_projection": sp, "params": params, "bytes": size(f)})
        if skip_peft:
            continue
        from peft import RandLoraConfig, get_peft_model

        for sp in (True, False):
            model = llama()
            model.load_state_dict(base_state)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pm = get_peft_model(model, RandLoraConfig(r=32, target_modules=targets, save_projection=sp))
            params = sum(p.numel() for p in pm.parameters() if p.requires_grad)
            with tempfile.TemporaryDirectory() as d:
                pm.save_pretrained(d)
                rows.append({"targets": label, "writer": "peft save_pretrained", "save_projection": sp,
                             "params": params, "bytes": size(Path(d))})
            del pm, model
    return rows


def generation_times(repeats: int = 3) -> list[dict]:
    shape = BankShape(r=32, M=11008, m=4096)
    rows = []
    for recipe in ("portable", "peft"):
        for mode in MODES:
            ts = []
            for _ in range(repeats if recipe == "portable" else 1):
                t = time.perf_counter()
                generate(recipe, 0, mode, shape)
                ts.append(time.perf_counter() - t)
            rows.append({"recipe": recipe, "mode": mode, "seconds": statistics.median(ts), "runs": len(ts)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-peft", action="store_true", help="do not run peft's save_pretrained (writes ~1 GB)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    gen = generation_times()
    print("\nBank generation, Llama-7B all-linear (A 32 x 4096, B 11008 x 128 x 32), median seconds:")
    for g in gen:
        print(f"  {g['recipe']:>8} {g['mode']:<12} {g['seconds']:.2f} s ({g['runs']} runs)")
    rows = file_sizes(args.skip_peft)
    print("\n| targets | writer | save_projection | trainable params | file size | bytes / param |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mb = r["bytes"] / 1e6
        print(f"| {r['targets']} | {r['writer']} | {r['save_projection']} | {r['params']:,} | "
              f"{mb:.2f} MB | {r['bytes'] / r['params']:.1f} |")
    ok = True
    for r in rows:
        if r["writer"] == "randlora.save (recipe=portable)" and r["targets"] == "all 7 linear":
            limit = 15e6 if r["save_projection"] else 4 * r["params"] + 64 * 1024
            verdict = "ok" if r["bytes"] <= limit else "OVER"
            ok &= r["bytes"] <= limit
            print(f"target save_projection={r['save_projection']}: {r['bytes']:,} bytes <= {int(limit):,}: {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({"generation": gen, "files": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
