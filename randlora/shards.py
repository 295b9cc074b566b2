"""Weight checkpoints on disk for the command line: one ``.safetensors`` file, or a model folder, sharded
(``model-0000N-of-0000M.safetensors`` with ``model.safetensors.index.json``, what ``save_pretrained`` writes past
its shard size) or not (``model.safetensors``).

:func:`open_checkpoint` reads the headers only (no tensor) and checks that the index and its shards agree;
:class:`Checkpoint` gives the tensor entries of every shard together (what the adapter is matched against) and
each shard's own. :func:`write_folder` writes a merged checkpoint folder: every shard under its own name, written
one after the other by the caller's function, the index copied unchanged (the tensors keep their names, dtypes
and shapes, so its ``weight_map`` and ``total_size`` still hold), and the folder's other files (``config.json``,
tokenizer files, ``generation_config.json``...) copied beside them; the folder replaces an existing one only
with ``force``, and only once it is complete.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import CheckpointError
from .paths import examples

__all__ = ["INDEX_SUFFIX", "Checkpoint", "open_checkpoint", "is_model_folder", "write_folder", "check_new_folder"]

INDEX_SUFFIX = ".safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


@dataclass
class Checkpoint:
    """A weight checkpoint's headers: ``shards`` maps each file's name to ``(header length, tensor entries)``
    (one entry for a single file); ``folder`` is the model folder (None for a ``.safetensors`` file given
    alone) and ``index`` its index file (None when not sharded)."""

    base: Path  # what was given (named in errors)
    shards: dict[str, tuple[int, dict[str, dict]]]
    folder: Path | None = None
    index: Path | None = None

    @property
    def entries(self) -> dict[str, dict]:
        """Every tensor's entry, all shards together (a tensor's ``data_offsets`` are within its own shard)."""
        return {k: e for _, ents in self.shards.values() for k, e in ents.items()}

    @property
    def header_size(self) -> int:
        """The header length of a single-file checkpoint (0 when sharded: each shard has its own)."""
        return next(iter(self.shards.values()))[0] if len(self.shards) == 1 else 0

    def path(self, shard: str) -> Path:
        """The file of ``shard`` (a key of :attr:`shards`)."""
        return self.folder / shard if self.folder is not None else self.base


def open_checkpoint(base: str | os.PathLike) -> Checkpoint:
    """Read the headers of the weight checkpoint ``base`` (no tensor is read).

    Args:
        base: a ``.safetensors`` file; a sharded checkpoint's ``*.safetensors.index.json``; or a model folder
            holding one such index, or else one ``.safetensors`` file.

    Returns:
        A :class:`Checkpoint`.

    Raises:
        CheckpointError: a missing path, a folder holding no safetensors weights (or several candidates), an
            unreadable index or shard, an index naming shards the folder lacks, or shards whose tensors are not
            the ones the index lists for them (or a tensor in two shards).
    """
    from .files import read_header, tensor_entries

    base = Path(base)
    if base.is_dir():
        return _open_folder(base)
    if is_model_folder(base):
        return _open_index(base, base)
    n, header = read_header(base)
    return Checkpoint(base, {base.name: (n, tensor_entries(header))})


def is_model_folder(base: Path) -> bool:
    """Whether ``base`` names a model folder (a folder, or a sharded checkpoint's index), which ``merge`` writes
    as a folder, rather than one ``.safetensors`` file."""
    return base.is_dir() or base.name.endswith(".json")


def _open_folder(folder: Path) -> Checkpoint:
    """A model folder: its one index (sharded), else its one ``.safetensors`` file."""
    from .files import read_header, tensor_entries

    indexes = sorted(p for p in folder.iterdir() if p.name.endswith(INDEX_SUFFIX) and p.is_file())
    singles = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" and p.is_file())
    if len(indexes) == 1:
        return _open_index(indexes[0], folder)
    if not indexes and len(singles) == 1:
        n, header = read_header(singles[0])
        return Checkpoint(folder, {singles[0].name: (n, tensor_entries(header))}, folder=folder)
    found = [p.name for p in indexes or singles]
    names = sorted(p.name for p in folder.iterdir())
    what = (f"several index files ({examples(found)})" if indexes else f"several .safetensors files "
            f"({examples(found)}) and no *{INDEX_SUFFIX}" if singles else
            f"no safetensors weights (it holds {len(names)} entries{': ' + examples(names) if names else ''})")
    raise CheckpointError(f"the model folder {folder} has {what}; nothing was written. Pass the weight file itself "
                          f"(--base <file>.safetensors) or the index of a sharded checkpoint (--base "
                          f"<folder>/model{INDEX_SUFFIX})")


def _open_index(index: Path, given: Path) -> Checkpoint:
    """A sharded checkpoint from its index: every shard's header, checked against the index's ``weight_map``."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not a mapping of tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a readable safetensors index (model{INDEX_SUFFIX} with a "
                              f"'weight_map'): {type(e).__name__}: {e}; nothing was written. Pass the index "
                              "save_pretrained wrote, its folder, or a single .safetensors weight file") from None
    folder = index.parent
    names = sorted(set(weight_map.values()))
    absent = [n for n in names if not (folder / n).is_file() or Path(n).name != n]
    if absent:
        raise CheckpointError(f"{index} lists {len(names)} shard files but {len(absent)} of them are not in "
                              f"{folder} ({examples(absent)}); nothing was written. Download or copy the whole "
                              "checkpoint (every shard the index names) into that folder")
    return Checkpoint(given, {n: _shard(folder / n, n, weight_map, index) for n in names}, folder, index)


def _shard(path: Path, name: str, weight_map: dict[str, str], index: Path) -> tuple[int, dict[str, dict]]:
    """One shard's header, whose tensors must be exactly those the index places in it."""
    from .files import read_header, tensor_entries

    n, header = read_header(path)
    entries = tensor_entries(header)
    listed = {k for k, v in weight_map.items() if v == name}
    if set(entries) != listed:
        extra, missing = sorted(set(entries) - listed), sorted(listed - set(entries))
        raise CheckpointError(
            f"{path} does not hold the tensors {index.name} places in it ("
            + "; ".join(s for s in (f"{len(missing)} missing: {examples(missing)}" if missing else "",
                                    f"{len(extra)} not listed there: {examples(extra)}" if extra else "") if s)
            + "); nothing was written. The index and its shards come from different saves: download or save the "
            "checkpoint again")
    return n, entries


def check_new_folder(out: Path, force: bool) -> None:
    """The rule for a merged checkpoint folder: refuse a file there, and a non-empty folder unless ``force``.

    Raises:
        CheckpointError: ``out`` is a file, or a non-empty folder and ``force`` is False.
    """
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; nothing was written. A checkpoint folder is written as a "
                              "folder (its shards, index, config and tokenizer files): pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"--out {out} already exists and is not empty; nothing was written. Pass --force to "
                              "replace it (the old folder stays until the new one is complete), or another path")


def write_folder(ck: Checkpoint, out: Path, force: bool, write_shard: Callable[[str, str], None]) -> None:
    """Write the checkpoint folder ``out``: ``write_shard(shard name, file to write)`` for each shard in turn,
    then ``ck``'s index (unchanged) and the folder's other files; an existing ``out`` is replaced only once the
    new folder is complete, and a failure leaves it as it was.

    Args:
        ck: the checkpoint read (a model folder: ``ck.folder`` is set).
        out: the folder to write.
        force: replace an existing non-empty ``out``.
        write_shard: writes one shard's file.

    Raises:
        CheckpointError: as :func:`check_new_folder`; anything ``write_shard`` raises.
    """
    check_new_folder(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    try:
        for name in ck.shards:
            write_shard(name, str(tmp / name))
            _fsync(tmp / name)
        for p in _side_files(ck):
            shutil.copy2(p, tmp / p.name)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _side_files(ck: Checkpoint) -> list[Path]:
    """The index and the folder's files that are not weights (config, tokenizer, generation config...)."""
    rest = [p for p in sorted(ck.folder.iterdir()) if p.is_file() and not p.name.startswith(".")
            and p.name not in ck.shards and not p.name.endswith((*_WEIGHT_SUFFIXES, ".index.json"))]
    return rest + ([ck.index] if ck.index is not None and ck.index not in rest else [])


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _swap(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` at ``out``; an existing ``out`` is moved aside first and then removed."""
    if out.is_dir():
        old = out.parent / f".{out.name}.{secrets.token_hex(6)}.old"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
