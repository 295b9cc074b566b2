"""Command line: ``python -m randlora merge ...`` and ``python -m randlora inspect ...`` (also ``randlora ...``).

``merge`` folds an adapter (this library's ``.safetensors`` file or a peft adapter folder) into a
safetensors weight file with no model code: ``W' = W + s·ΔW`` per adapted weight (float32 accumulation,
cast back to the weight's dtype, exactly as :func:`randlora.merge`), trained biases replaced. It streams:
the output keeps the input's header and byte layout, untouched tensors are copied as raw bytes, and only
one adapted tensor at a time is decoded. ``inspect`` prints an adapter's settings, layers, parameter
counts and fingerprint.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path
from typing import Sequence

import torch

from .bank import Fingerprint, _checksum
from .checkpoint import FP, read_file
from .errors import CheckpointError, FingerprintMismatch, RandLoraError
from .ops import acc_dtype, delta_weight
from .peft_io import PEFT_CONFIG, PEFT_WEIGHTS, is_peft_folder, read_peft
from .recipes import bank_shape, generate
from .walker import AdapterConfig

__all__ = ["main", "merge_file", "read_adapter"]

_COPY_BLOCK = 16 << 20
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], AdapterConfig, dict]:
    """Read this library's adapter file or a peft adapter folder.

    Returns ``(tensors, settings, info)``; ``info["format"]`` is ``"randlora"`` or ``"peft"``, and for peft
    ``info["fan_in_fan_out"]`` is the folder's flag (it applies to every layer).
    """
    path = Path(path)
    if path.is_file() and path.name == PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).is_file():
        path = path.parent
    if path.is_dir():
        if not is_peft_folder(path):
            raise CheckpointError(f"{path} is a folder without {PEFT_CONFIG}; pass an adapter .safetensors file "
                                  "or a peft adapter folder")
        tensors, cfg, raw = read_peft(path)
        return tensors, cfg, {"format": "peft", "fan_in_fan_out": bool(raw.get("fan_in_fan_out")), "raw": raw}
    tensors, cfg = read_file(path)
    return tensors, cfg, {"format": "randlora"}


def _layers(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(".randlora_lambda")] for k in tensors if k.endswith(".randlora_lambda"))


def _header(path: Path) -> tuple[int, dict]:
    """``(header length, header dict)`` of a safetensors file, read without loading any tensor."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors weight file ({e})") from None
    return n, header


def _bases(tensors: dict[str, torch.Tensor], cfg: AdapterConfig, info: dict,
           shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's bases: from the adapter when it holds them (checked), else regenerated (verified)."""
    shape = bank_shape(cfg.recipe, cfg.r, shapes)
    stored = tensors.get(FP)
    if "randlora_A" in tensors:
        A, B = tensors["randlora_A"].float(), tensors["randlora_B"].float()
        if (tuple(A.shape), tuple(B.shape)) != ((shape.r, shape.m), (shape.M, shape.n, shape.r)):
            raise CheckpointError(f"the adapter's bases have shapes A{tuple(A.shape)}, B{tuple(B.shape)} but the "
                                  f"weight file's layers need A({shape.r}, {shape.m}), B({shape.M}, {shape.n}, "
                                  f"{shape.r}); is it the adapter of another model?")
        if stored is not None and _checksum(A, B) != int(stored[-1]):
            raise CheckpointError("the adapter's bases do not match its own checksum: the file is corrupt")
        return A, B
    A, B = generate(cfg.recipe, cfg.seed, cfg.bases, shape)
    if stored is not None:
        diff = Fingerprint(cfg.seed, cfg.recipe, cfg.bases, shape.r, shape.M, shape.m,
                           _checksum(A, B)).differences(stored)
        if diff:
            raise FingerprintMismatch(f"the adapter was made with other bases than these layers give "
                                      f"({'; '.join(diff)}); is the weight file the adapter's base model?")
    elif info["format"] != "peft":
        raise FingerprintMismatch("the adapter has neither a fingerprint nor bases, so it cannot be verified")
    return A, B


def merge_file(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
               prefix: str = "") -> dict:
    """Write ``out``: the safetensors weight file ``base`` with ``adapter`` folded in, streaming.

    ``prefix`` is prepended to the adapter's module paths to find ``<prefix><path>.weight`` in ``base``.
    Returns a summary (layers merged, biases replaced).
    """
    from safetensors import safe_open

    base, out = Path(base), Path(out)
    tensors, cfg, info = read_adapter(adapter)
    n_header, header = _header(base)
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    layers = _layers(tensors)
    ffo = set(cfg.fan_in_fan_out) if info["format"] == "randlora" else (set(layers) if info["fan_in_fan_out"] else set())
    wkeys = {p: f"{prefix}{p}.weight" for p in layers}
    missing = [k for k in wkeys.values() if k not in entries]
    if missing:
        some = [k for k in entries if k.endswith(".weight")][:3]
        raise CheckpointError(f"{base} has no tensors {missing[:3]}{' ...' if len(missing) > 3 else ''} for the "
                              f"adapter's layers; its weights are named like {some}. Use --prefix to map the "
                              "adapter's module paths onto the file's keys")
    shapes, dtypes = {}, set()
    for p, k in wkeys.items():
        e = entries[k]
        if len(e["shape"]) != 2 or e["dtype"] not in _DTYPES:
            raise CheckpointError(f"{k} in {base} is {e['dtype']} {e['shape']}; a 2-D floating-point weight is needed")
        d0, d1 = e["shape"]
        O, I = (d1, d0) if p in ffo else (d0, d1)
        gam = tensors[f"{p}.randlora_gamma"]
        n = -(-min(O, I) // cfg.r)
        if tuple(gam.shape) != (n, min(O, I)):
            raise CheckpointError(f"{k} has shape {e['shape']} but the adapter's randlora_gamma for it is "
                                  f"{tuple(gam.shape)} (expected ({n}, {min(O, I)})); wrong base model?")
        shapes[p] = (O, I)
        dtypes.add(_DTYPES[e["dtype"]])
    bias_keys = {f"{prefix}{k}": k for k in tensors if k.endswith(".bias")}
    nob = [k for k in bias_keys if k not in entries]
    if nob:
        raise CheckpointError(f"{base} has no tensors {nob[:3]} for the adapter's trained biases")
    A, B = _bases(tensors, cfg, info, list(shapes.values()))
    bank_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32  # as randlora.inject sizes the bank
    A, B = A.to(bank_dtype), B.to(bank_dtype)
    B2 = B.view(B.shape[0], -1)
    s = cfg.alpha / cfg.r
    by_key = {k: p for p, k in wkeys.items()}

    def merged(key: str, t: torch.Tensor) -> torch.Tensor:
        if key in bias_keys:
            return tensors[bias_keys[key]].to(t.dtype)
        p = by_key[key]
        O, I = shapes[p]
        m, M = min(O, I), max(O, I)
        n = -(-m // cfg.r)
        W = t.t() if p in ffo else t
        acc = acc_dtype(W.dtype)
        new = W.to(acc) + delta_weight(tensors[f"{p}.randlora_lambda"], tensors[f"{p}.randlora_gamma"],
                                       A[:, :m], B2[:M, : n * cfg.r], s, O < I, acc)
        new = new.to(t.dtype)
        return (new.t() if p in ffo else new).contiguous()

    touched = set(by_key) | set(bias_keys)
    order = sorted(entries, key=lambda k: entries[k]["data_offsets"][0])
    start = 8 + n_header
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(base, "rb") as src, open(tmp, "wb") as dst, safe_open(str(base), framework="pt") as f:
            dst.write(src.read(start))  # the header is unchanged: same keys, dtypes, shapes and offsets
            for k in order:
                a, b = entries[k]["data_offsets"]
                if k in touched:
                    data = merged(k, f.get_tensor(k)).reshape(-1).view(torch.uint8).numpy().tobytes()
                    if len(data) != b - a:
                        raise CheckpointError(f"internal error: merged {k} has {len(data)} bytes, expected {b - a}")
                    dst.write(data)
                else:
                    src.seek(start + a)
                    left = b - a
                    while left:
                        chunk = src.read(min(left, _COPY_BLOCK))
                        if not chunk:
                            raise CheckpointError(f"{base} is truncated (tensor {k})")
                        dst.write(chunk)
                        left -= len(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, out)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return {"layers": len(layers), "biases": len(bias_keys), "format": info["format"]}


def describe(path: str | os.PathLike) -> dict:
    """What ``inspect`` prints, as a dict."""
    tensors, cfg, info = read_adapter(path)
    layers = _layers(tensors)
    rows = []
    for p in layers:
        lam, gam = tensors[f"{p}.randlora_lambda"], tensors[f"{p}.randlora_gamma"]
        rows.append({"layer": p, "lambda": list(lam.shape), "gamma": list(gam.shape),
                     "params": lam.numel() + gam.numel()})
    biases = sorted(k for k in tensors if k.endswith(".bias"))
    d: dict = {
        "path": str(path),
        "format": info["format"],
        "settings": cfg.to_dict(),
        "layers": rows,
        "adapter_params": sum(r["params"] for r in rows),
        "bias_params": sum(tensors[k].numel() for k in biases),
        "biases": biases,
        "bases_saved": "randlora_A" in tensors,
    }
    if "randlora_A" in tensors:
        d["bases"] = {"A": list(tensors["randlora_A"].shape), "B": list(tensors["randlora_B"].shape)}
    if FP in tensors:
        v = tensors[FP].tolist()
        names = ["version", "seed", "recipe_id", "mode", "r", "M_g", "m_g", "n_g", "checksum"]
        fp = dict(zip(names, v))
        fp["checksum"] = f"{v[-1] & 0xFFFFFFFFFFFFFFFF:016x}"
        d["fingerprint"] = fp
    else:
        d["fingerprint"] = None
    if info["format"] == "peft":
        d["peft_config"] = {k: info["raw"].get(k) for k in ("peft_version", "fan_in_fan_out", "layers_to_transform",
                                                              "save_projection", "target_modules")}
    return d


def _print_inspect(d: dict) -> None:
    s = d["settings"]
    print(f"adapter: {d['path']} ({d['format']})")
    print(f"settings: r={s['r']} alpha={s['alpha']:g} dropout={s['dropout']:g} seed={s['seed']} "
          f"bases={s['bases']} recipe={s['recipe']} bias={s['bias']}")
    if d["bases_saved"]:
        print(f"bases: saved, A {tuple(d['bases']['A'])}, B {tuple(d['bases']['B'])}")
    else:
        print(f"bases: not saved (regenerated from seed {s['seed']} with recipe {s['recipe']!r})")
    fp = d["fingerprint"]
    if fp is None:
        print("fingerprint: none (peft folders carry none)")
    else:
        print(f"fingerprint: version={fp['version']} seed={fp['seed']} mode={fp['mode']} r={fp['r']} "
              f"M_g={fp['M_g']} m_g={fp['m_g']} n_g={fp['n_g']} checksum={fp['checksum']}")
    w = max([len("layer")] + [len(r["layer"]) for r in d["layers"]])
    print(f"{'layer':<{w}}  {'lambda':>12}  {'gamma':>14}  {'params':>10}")
    for r in d["layers"]:
        print(f"{r['layer']:<{w}}  {str(tuple(r['lambda'])):>12}  {str(tuple(r['gamma'])):>14}  {r['params']:>10,}")
    print(f"{len(d['layers'])} layers, {d['adapter_params']:,} adapter parameters (lambda, gamma)"
          + (f", {d['bias_params']:,} bias parameters in {len(d['biases'])} tensors" if d["biases"] else ""))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="randlora", description="RandLora adapters: merge into weights, inspect.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="fold an adapter into a safetensors weight file (streaming, no model code)")
    m.add_argument("--base", required=True, help="the base model's .safetensors weight file")
    m.add_argument("--adapter", required=True, help="a randlora .safetensors adapter or a peft adapter folder")
    m.add_argument("--out", required=True, help="where to write the merged .safetensors file")
    m.add_argument("--prefix", default="", help="prepended to the adapter's module paths to find them in --base")
    i = sub.add_parser("inspect", help="print an adapter's settings, layers, parameter counts, fingerprint")
    i.add_argument("adapter", help="a randlora .safetensors adapter or a peft adapter folder")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    e = sub.add_parser("export-lora", help="write a plain peft LoRA folder (truncated SVD of each layer's update)")
    e.add_argument("adapter", help="a randlora .safetensors adapter or a peft RandLora adapter folder")
    e.add_argument("--base", required=True, help="the base model's .safetensors weight file (for the layer shapes)")
    e.add_argument("--out", required=True, help="the LoRA folder to write (must not exist or be empty)")
    k = e.add_mutually_exclusive_group(required=True)
    k.add_argument("--rank", help="LoRA rank of every layer (an int, or 'full' for exact)")
    k.add_argument("--energy", type=float, help="keep this fraction in (0, 1] of each layer's squared norm")
    e.add_argument("--prefix", default="", help="prepended to the adapter's module paths to find them in --base")
    e.add_argument("--method", default="auto", choices=["auto", "svd", "lowrank"], help="SVD algorithm")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="factor dtype (default: the weights')")
    e.add_argument("--overwrite", action="store_true", help="replace the adapter files of a non-empty --out")
    return p


def _export_lora(args: argparse.Namespace) -> None:
    """``export-lora``: :func:`randlora.export.export_file`, then the per-layer table."""
    from .export import export_file

    rank = args.rank
    if rank is not None and rank != "full":
        try:
            rank = int(rank)
        except ValueError:
            raise RandLoraError(f"--rank must be a positive int or 'full', got {args.rank!r}") from None
    exp = export_file(args.adapter, args.base, args.out, rank, args.energy, prefix=args.prefix, method=args.method,
                      dtype=getattr(torch, args.dtype) if args.dtype else None, overwrite=args.overwrite)
    print(exp)
    print(f"wrote a LoRA adapter (r={max(exp.ranks.values())}) to {args.out} in {exp.seconds:.2f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m randlora`` / ``randlora``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "export-lora":
            _export_lora(args)
        elif args.cmd == "merge":
            r = merge_file(args.base, args.adapter, args.out, prefix=args.prefix)
            print(f"merged {r['layers']} layers ({r['format']} adapter)"
                  + (f" and {r['biases']} biases" if r["biases"] else "") + f" into {args.out}")
        else:
            d = describe(args.adapter)
            if args.json:
                print(json.dumps(d, indent=2))
            else:
                _print_inspect(d)
    except RandLoraError as e:
        print(f"randlora: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
