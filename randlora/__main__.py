"""Command line: ``python -m randlora merge|inspect|export-lora ...`` (also ``randlora ...``).

``merge`` folds an adapter (this library's ``.safetensors`` file, a Trainer checkpoint folder or a peft
adapter folder) into a safetensors weight file, or a model folder (sharded: ``model-0000N-of-0000M.safetensors``
with its index; :mod:`randlora.shards`), with no model code: ``W' = W + s·ΔW`` per adapted weight
(float32 accumulation, cast back to the weight's dtype, exactly as :func:`randlora.merge`), trained biases
replaced; from a Trainer checkpoint folder, the parameters trained beside the adapter (its
``randlora_trainable.safetensors``, e.g. a task head) replace the file's too, and a file without a place for
them is refused. It streams: the output keeps the input's header and byte layout, untouched tensors are copied
as raw bytes, and only one adapted tensor at a time is decoded; a model folder is written as a folder, shard by
shard under the same names, with its index and its config and tokenizer files copied beside them. ``inspect`` prints an adapter's settings,
layers, parameter counts and fingerprint. ``export-lora`` writes a plain LoRA folder
(:func:`randlora.export.export_file`).

The adapter's layer paths are mapped onto the weight file's keys by :func:`randlora.paths.match_paths`
(exact, else the unique leading prefix added or stripped); ``--prefix FROM=TO`` overrides it. A command
never replaces an existing output unless given ``--force``, and then atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from .bank import FINGERPRINT_KEYS
from .bank import FP
from .filefmt import atomic_write
from .errors import CheckpointError, RandLoraError
from .files import layer_paths, read_adapter, read_for_weights, trained_for_weights
from .ops import acc_dtype
from .paths import PathMap
from .shards import check_new_folder, is_model_folder, write_folder
from .walker import is_bias_name

__all__ = ["main", "merge_file", "read_adapter"]

_COPY_BLOCK = 16 << 20  # bytes an untouched tensor is copied in at a time, so memory stays flat


def merge_file(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
               prefix: object = None, force: bool = False) -> dict:
    """Write ``out``: the safetensors weight file (or model folder) ``base`` with ``adapter`` folded in, streaming.

    ``W' = W + s·ΔW`` per adapted weight (float32 accumulation, cast back to the weight's dtype, exactly as
    :func:`randlora.merge`); trained biases are replaced, and so are the parameters a Trainer checkpoint folder
    holds beside its adapter (:func:`randlora.files.trained_for_weights`). ``out`` keeps ``base``'s header and
    byte layout; untouched tensors are copied as raw bytes and one adapted tensor at a time is decoded. ``out`` is
    written atomically (with ``force``, an existing file is replaced only once the new one is complete). A model
    folder (sharded or not) gives a folder: each shard streamed under its own name in turn (memory: the adapter
    and one tensor), the index and the folder's other files (config, tokenizer) copied
    (:func:`randlora.shards.write_folder`).

    Args:
        base: the base model's ``.safetensors`` weight file; or a model folder, or a sharded checkpoint's
            ``model.safetensors.index.json`` (:func:`randlora.shards.open_checkpoint`).
        adapter: this library's ``.safetensors`` adapter, a Trainer checkpoint folder holding one, or a peft
            RandLora adapter folder.
        out: the merged weight file to write (its folder is created); for a model folder ``base``, the folder
            to write.
        prefix: None to map the adapter's module paths onto ``base``'s keys automatically (exact, else the
            unique leading prefix added or stripped), or an override: ``"FROM=TO"``, ``"TO"`` (added) or
            ``(FROM, TO)`` (see :func:`randlora.files.read_for_weights`).
        force: replace an existing ``out`` (without it an existing ``out`` is refused before any work).

    Returns:
        A summary: ``{"layers": layers merged, "biases": biases replaced, "trained": tensors trained beside the
        adapter replaced, "format": "randlora" or "peft", "file": the adapter file read, "paths": the
        :class:`randlora.paths.PathMap` used}``.

    Raises:
        CheckpointError: ``out`` exists (without ``force``; a non-empty folder for a model folder ``base``) or is
            a folder (a file for a model folder), an unreadable adapter or weight file, index or shard (see
            :func:`randlora.shards.open_checkpoint`), layer paths that do not map onto ``base``'s weights (or map in several ways), trained biases
            missing from ``base``, weights that are not 2-D floating point or do not fit the adapter's
            shapes, stored bases of the wrong shape or failing their checksum, or a checkpoint folder whose
            parameters trained beside the adapter have no tensor of their shape in ``base``.
        FingerprintMismatch: regenerated bases that are not the ones the adapter was made with.
    """
    base, out = Path(base), Path(out)
    folder = is_model_folder(base)
    (check_new_folder if folder else check_new_file)(out, force)
    fa = read_for_weights(adapter, base, prefix)
    trained = trained_for_weights(adapter, fa)
    bias_keys = fa.bias_keys()
    A, B = fa.bases()
    by_key = {k: p for p, k in fa.keys.items()}
    touched = set(by_key) | set(bias_keys) | set(trained)

    def merged(key: str, t: torch.Tensor) -> torch.Tensor:
        t = trained.get(key, t)
        if key in bias_keys:
            return fa.tensors[bias_keys[key]].to(t.dtype)
        if key not in by_key:
            return t.contiguous()
        p = by_key[key]
        W = t if fa.stacked(p) else t.t() if p in fa.ffo else t.reshape(t.shape[0], -1)  # (a conv kernel: its matrix)
        acc = acc_dtype(W.dtype)
        new = (W.to(acc) + fa.delta(p, A, B, acc)).to(t.dtype)
        return (new.t() if p in fa.ffo else new.reshape(t.shape)).contiguous()

    ck = fa.checkpoint
    if folder:  # shard by shard: each shard's own header, entries and adapted tensors
        write_folder(ck, out, force, lambda name, tmp: _stream(ck.path(name), tmp, 8 + ck.shards[name][0],
                                                               ck.shards[name][1], touched, merged))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: _stream(base, tmp, 8 + fa.header_size, fa.entries, touched, merged))
    return {"layers": len(fa.layers), "biases": len(bias_keys), "trained": len(trained),
            "format": fa.info["format"], "file": str(fa.info["file"]), "paths": fa.pathmap}


def check_new_file(out: Path, force: bool) -> None:
    """The one rule for a command's output file: refuse an existing ``out`` unless ``force`` (then it is
    replaced atomically by the caller), and always refuse a folder there.

    Raises:
        CheckpointError: ``out`` is a folder, or exists and ``force`` is False.
    """
    if out.is_dir():
        raise CheckpointError(f"--out {out} is a folder; nothing was written. Pass the path of the .safetensors "
                              "file to write")
    if out.exists() and not force:
        raise CheckpointError(f"--out {out} already exists; nothing was written. Pass --force to replace it "
                              "(atomically: the old file stays until the new one is complete), or another path")


def _stream(base: Path, tmp: str, start: int, entries: dict[str, dict], touched: set[str],
            merged: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Write ``base`` to ``tmp`` in its byte order, the ``touched`` tensors replaced by ``merged``. Each touched
    tensor is read through a memory map of its own, closed once it is written, so the pages read stay mapped for
    one tensor only (one map for the whole file held every adapted weight's pages: memory grew with the file)."""
    from safetensors import safe_open

    with open(base, "rb") as src, open(tmp, "wb") as dst:
        dst.write(src.read(start))  # the header is unchanged: same keys, dtypes, shapes and offsets
        for k in sorted(entries, key=lambda k: entries[k]["data_offsets"][0]):
            a, b = entries[k]["data_offsets"]
            if k in touched:
                with safe_open(str(base), framework="pt") as f:
                    data = merged(k, f.get_tensor(k)).reshape(-1).view(torch.uint8).numpy().tobytes()
                if len(data) != b - a:
                    raise CheckpointError(f"internal error: merged {k} has {len(data)} bytes, expected {b - a}")
                dst.write(data)
            else:
                _copy_bytes(src, dst, start + a, b - a, f"{base} is truncated (tensor {k})")


def _copy_bytes(src, dst, offset: int, size: int, truncated: str) -> None:
    """Copy ``size`` bytes at ``offset`` of ``src`` to ``dst`` in blocks; ``truncated`` is the error if short."""
    src.seek(offset)
    while size:
        chunk = src.read(min(size, _COPY_BLOCK))
        if not chunk:
            raise CheckpointError(truncated)
        dst.write(chunk)
        size -= len(chunk)


def describe(path: str | os.PathLike) -> dict:
    """What ``inspect`` prints, as a dict."""
    tensors, cfg, info = read_adapter(path)
    rows = _layer_rows(tensors)
    biases = sorted(k for k in tensors if is_bias_name(k))
    d: dict = {
        "path": str(path),
        "file": str(info["file"]),
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
    d["fingerprint"] = _fingerprint_fields(tensors[FP]) if FP in tensors else None
    if info["format"] == "peft":
        d["peft_config"] = {k: info["raw"].get(k) for k in ("peft_version", "fan_in_fan_out", "layers_to_transform",
                                                              "save_projection", "target_modules")}
    return d


def _layer_rows(tensors: dict[str, torch.Tensor]) -> list[dict]:
    rows = []
    for p in layer_paths(tensors):
        lam, gam = tensors[f"{p}.randlora_lambda"], tensors[f"{p}.randlora_gamma"]
        rows.append({"layer": p, "lambda": list(lam.shape), "gamma": list(gam.shape),
                     "params": lam.numel() + gam.numel()})
    return rows


def _fingerprint_fields(t: torch.Tensor) -> dict:
    v = t.tolist()
    fp = dict(zip(FINGERPRINT_KEYS, v))
    fp["checksum"] = f"{v[-1] & 0xFFFFFFFFFFFFFFFF:016x}"
    return fp


def _print_inspect(d: dict) -> None:
    s = d["settings"]
    print(f"adapter: {d['path']} ({d['format']})")
    if d["file"] != d["path"]:
        print(f"read: {d['file']}")
    print(f"settings: r={s['r']} alpha={s['alpha']:g} init={s.get('init', 'peft')} dropout={s['dropout']:g} "
          f"seed={s['seed']} bases={s['bases']} recipe={s['recipe']} bias={s['bias']}")
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
    m.add_argument("--base", required=True, help="the base model's .safetensors weight file, or its model folder "
                   "or model.safetensors.index.json (sharded checkpoint)")
    m.add_argument("--adapter", required=True, help=_ADAPTER_HELP)
    m.add_argument("--out", required=True, help="the merged .safetensors file to write, or the folder for a model "
                   "folder --base (must not exist or be empty, or --force)")
    m.add_argument("--prefix", default=None, metavar="FROM=TO", help=_PREFIX_HELP)
    m.add_argument("--force", action="store_true", help="replace an existing --out (atomically)")
    i = sub.add_parser("inspect", help="print an adapter's settings, layers, parameter counts, fingerprint")
    i.add_argument("adapter", help=_ADAPTER_HELP)
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    e = sub.add_parser("export-lora", help="write a plain peft LoRA folder (truncated SVD of each layer's update)")
    e.add_argument("adapter", help=_ADAPTER_HELP)
    e.add_argument("--base", required=True, help="the base model's .safetensors weight file, model folder or "
                   "model.safetensors.index.json (for the layer shapes)")
    e.add_argument("--out", required=True, help="the LoRA folder to write (must not exist or be empty, or --force)")
    from .export import DEFAULT_ENERGY

    k = e.add_mutually_exclusive_group()
    k.add_argument("--rank", help="LoRA rank of every layer (an int, or 'full' for exact)")
    k.add_argument("--energy", type=float, help="keep this fraction in (0, 1] of each layer's squared norm "
                   f"(default when neither is given: {DEFAULT_ENERGY}, a relative error of at most "
                   f"{(1 - DEFAULT_ENERGY) ** 0.5:.2g} per layer)")
    e.add_argument("--prefix", default=None, metavar="FROM=TO", help=_PREFIX_HELP)
    e.add_argument("--method", default="auto", choices=["auto", "svd", "lowrank"], help="SVD algorithm")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="factor dtype (default: the weights')")
    e.add_argument("--force", action="store_true", help="replace the adapter files of an existing, non-empty --out "
                   "(each atomically)")
    e.add_argument("--overwrite", action="store_true", dest="force", help=argparse.SUPPRESS)  # the old name
    return p


_ADAPTER_HELP = ("a randlora .safetensors adapter, a checkpoint folder of randlora.hf.RandLoraTrainer, or a peft "
                 "RandLora adapter folder")
_PREFIX_HELP = ("map the adapter's module paths onto --base's keys: FROM=TO replaces the leading FROM by TO "
                "(FROM= strips it), TO alone adds TO. Default: automatic (exact, else the unique prefix added or "
                "stripped that maps every layer)")


def _source(file: str, paths: PathMap) -> str:
    """``adapter file X`` plus the path mapping when it is not the identity, for the commands' output."""
    return f"adapter file {file}" + ("" if paths.identity else f", layer paths with {paths.describe()}")


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
                      dtype=getattr(torch, args.dtype) if args.dtype else None, overwrite=args.force)
    print(exp)
    print(f"wrote a LoRA adapter (r={max(exp.ranks.values())}) to {args.out} in {exp.seconds:.2f} s "
          f"({_source(exp.source['file'], exp.source['paths'])})")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m randlora`` / ``randlora``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "export-lora":
            _export_lora(args)
        elif args.cmd == "merge":
            r = merge_file(args.base, args.adapter, args.out, prefix=args.prefix, force=args.force)
            print(f"merged {r['layers']} layers ({r['format']} adapter)"
                  + (f" and {r['biases']} biases" if r["biases"] else "")
                  + (f" and {r['trained']} tensors trained beside it" if r["trained"] else "") + f" into {args.out} "
                  f"({_source(r['file'], r['paths'])})")
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
