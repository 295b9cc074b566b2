"""Adapter files read without model code: what ``merge``, ``inspect`` and ``export-lora`` share.

An adapter is this library's ``.safetensors`` file, a Trainer checkpoint folder holding one, or a peft
RandLora folder (:func:`read_adapter`); the base model is a safetensors weight file, of which only the
header is parsed (:func:`read_header`). The adapter's layer paths are mapped onto the file's weight keys by
the library's one matching rule (:func:`randlora.paths.match_paths`: exact, else the unique prefix added or
stripped; ``prefix`` overrides), which gives each adapted layer's weight key, shape and dtype
(:func:`weight_shapes`). The bases come from the adapter when it holds them, else they are regenerated
from its settings and verified (:func:`adapter_bases`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .bank import Fingerprint, bases_checksum, layer_views, stored_bases
from .checkpoint import ADAPTER_FILE, FP, adapter_path, read_file
from .errors import CheckpointError, FingerprintMismatch
from .ops import delta_weight
from .paths import PathMap, closest, examples, match_paths
from .peft_io import PEFT_CONFIG, PEFT_WEIGHTS, is_peft_folder, read_peft
from .recipes import bank_shape, generate, n_bases
from .walker import AdapterConfig, is_bias_name

if TYPE_CHECKING:
    from .shards import Checkpoint

__all__ = ["DTYPES", "FileAdapter", "read_for_weights", "read_adapter", "read_header", "tensor_entries",
           "layer_paths", "fan_in_fan_out_layers", "map_layers", "weight_shapes", "bank_dtype", "adapter_bases",
           "trained_for_weights"]

# safetensors dtype names of the weights an adapter can be folded into
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_HEADER = 100 << 20  # a larger header is a corrupt length field, not a real file


@dataclass
class FileAdapter:
    """An adapter read against a base model's weight file (its header only): what ``merge`` and
    ``export-lora`` work from."""

    tensors: dict[str, torch.Tensor]
    cfg: AdapterConfig
    info: dict  # as :func:`read_adapter` returns it
    header_size: int  # bytes of the weight file's JSON header (its data starts 8 bytes later)
    entries: dict[str, dict]  # the weight file's tensor entries
    layers: list[str]  # the adapted module paths, sorted
    ffo: set[str]  # the layers whose weight is stored ``(in, out)``
    shapes: dict[str, tuple[int, int]]  # each layer's ``(O, I)``
    dtypes: dict[str, torch.dtype]  # each layer's weight dtype
    pathmap: PathMap  # the adapter's paths -> the weight file's module paths
    keys: dict[str, str]  # each layer's weight key in the file (``pathmap(path) + ".weight"``)
    base: Path  # the weight file (named in errors)
    checkpoint: Checkpoint | None = None  # the weight file or model folder read (its shards' headers)

    def bias_keys(self) -> dict[str, str]:
        """The weight file's key of each trained bias -> the adapter's key (mapped by :attr:`pathmap`).

        Raises:
            CheckpointError: a trained bias has no tensor in the weight file.
        """
        keys = {self.pathmap(k): k for k in self.tensors if is_bias_name(k)}
        missing = sorted(k for k in keys if k not in self.entries)
        if missing:
            raise CheckpointError(f"{len(missing)} of the adapter's {len(keys)} trained biases "
                                  f"{'has' if len(missing) == 1 else 'have'} no tensor in "
                                  f"{self.base} (looked for {examples(missing)}, with {self.pathmap.describe()}); "
                                  "nothing was written. Merge into the weight file of the model the adapter was "
                                  "trained on, whose biases it replaces")
        return keys

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's bases (see :func:`adapter_bases`) in the dtype :func:`randlora.inject` would give the
        bank of these weights, so that results equal those of the adapted model."""
        A, B = adapter_bases(self.tensors, self.cfg, self.info, list(self.shapes.values()))
        dtype = bank_dtype(self.dtypes.values())
        return A.to(dtype), B.to(dtype)

    def stacked(self, path: str) -> bool:
        """Whether ``path`` is a 3-D adapted parameter ``(E, a, b)`` (its ``λ`` is ``(E, r, n)``)."""
        return self.tensors[f"{path}.randlora_lambda"].dim() == 3

    def delta(self, path: str, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Layer ``path``'s ``s·ΔW`` ``(O, I)`` in ``dtype``, from the bank ``A``, ``B`` of :meth:`bases`; a 3-D
        adapted parameter's ``(E, O, I)``, every expert's (:func:`randlora.experts.expert_delta`)."""
        O, I = self.shapes[path]
        Av, Bv = layer_views(A, B, O, I, self.cfg.r)
        if self.stacked(path):
            from .experts import expert_delta  # (the experts module imports the model-side machinery)

            return expert_delta(self.tensors[f"{path}.randlora_lambda"], self.tensors[f"{path}.randlora_gamma"], Av,
                                Bv, self.cfg.alpha / self.cfg.r, O < I, dtype)
        return delta_weight(self.tensors[f"{path}.randlora_lambda"], self.tensors[f"{path}.randlora_gamma"], Av,
                            Bv, self.cfg.alpha / self.cfg.r, O < I, dtype)


def read_for_weights(adapter: str | os.PathLike, base: str | os.PathLike, prefix: object = None) -> FileAdapter:
    """Read ``adapter`` and the header of the weight file ``base``, and match each adapted layer to its weight.

    Args:
        adapter: this library's ``.safetensors`` adapter, a Trainer checkpoint folder holding one, or a peft
            RandLora adapter folder.
        base: the base model's ``.safetensors`` weight file, or a model folder or the index of a sharded
            checkpoint (:func:`randlora.shards.open_checkpoint`; only headers are read).
        prefix: None to map the adapter's paths onto the file's by :func:`randlora.paths.match_paths` (exact,
            else the unique leading prefix added or stripped); or an override: ``"FROM=TO"`` (replace the
            leading ``FROM`` by ``TO``; ``"FROM="`` strips it), ``"TO"`` (add ``TO``) or ``(FROM, TO)``.

    Returns:
        A :class:`FileAdapter`.

    Raises:
        CheckpointError: an unreadable adapter or weight file, an adapter without layers, layer paths that
            no prefix (or not the one given) maps onto the file's weights, or several prefixes that do, or
            weights that do not fit the adapter (see :func:`weight_shapes`).
        ConfigError: a peft folder with settings this library does not support.
    """
    from .shards import open_checkpoint

    base = Path(base)
    tensors, cfg, info = read_adapter(adapter)
    ck = open_checkpoint(base)
    entries = ck.entries
    layers = layer_paths(tensors)
    if not layers:
        raise CheckpointError(f"{info['file']} holds no adapted layer (no randlora_lambda tensors); is it an "
                              "adapter written by randlora.save or randlora.save_peft?")
    gammas = {p: tuple(tensors[f"{p}.randlora_gamma"].shape) for p in layers if f"{p}.randlora_gamma" in tensors}
    pathmap = map_layers(layers, entries, base, prefix, gammas)
    keys = {p: weight_key(pathmap(p), entries) for p in layers}
    ffo = fan_in_fan_out_layers(cfg, info, layers)
    shapes, dtypes = weight_shapes(base, entries, tensors, cfg, layers, ffo, keys)
    return FileAdapter(tensors, cfg, info, ck.header_size, entries, layers, ffo, shapes, dtypes, pathmap, keys, base,
                       ck)


_CLI_PREFIX = ("On the command line, --prefix FROM=TO replaces the leading FROM of the adapter's paths by TO "
               "(--prefix FROM= strips it, --prefix TO adds TO)")


def map_layers(layers: list[str], entries: dict[str, dict], base: Path, prefix: object = None,
               gammas: dict[str, tuple] | None = None) -> PathMap:
    """How the adapter's layer paths map onto the module paths of the weight file's ``*.weight`` keys.

    :func:`randlora.paths.match_paths` with the file's keys ending in ``.weight`` (that suffix removed) as
    the model's paths; ``prefix`` is its override (None or ``""``: automatic); ``gammas`` (each layer's
    ``randlora_gamma`` shape) lets the error name layers whose widths differ from the file's weights.

    Raises:
        CheckpointError: no prefix maps every layer, several do, or the one given leaves some unmapped; the
            message names the cause (the layers' widths or the model's depth where they differ, an output layer
            tied to the embedding), a few paths of both sides, and how to pass ``--prefix`` where one helps.
    """
    have = [k[: -len(".weight")] for k in entries if k.endswith(".weight")]
    have += [k[: -len("_weight")] for k in entries if k == "in_proj_weight" or k.endswith(".in_proj_weight")]
    have += [k for k, e in entries.items() if not k.endswith("weight") and len(e["shape"]) in (2, 3)]  # parameters
    explicit = prefix if prefix != "" else None
    try:
        return match_paths(layers, have, prefix=explicit, model_desc=f"the weights of {base}",
                           widths=_file_widths(gammas or {}, entries))
    except CheckpointError as e:
        tied = None if explicit is not None else _tied_output(layers, set(have), entries, base)
        # the rule's words are the loaders'; from files, nothing is written either
        msg = tied or str(e).replace("nothing was loaded", "nothing was written").replace("Nothing was loaded",
                                                                                          "Nothing was written")
        helps = explicit is not None or "prefix=(" in msg or "--prefix" in msg
        raise CheckpointError(f"{msg}. {_CLI_PREFIX}" if helps else msg) from None


def _file_widths(gammas: dict[str, tuple], entries: dict[str, dict]):
    """For :func:`match_paths`' error: the layers a map reaches whose weight in the file is narrower or wider
    than the adapter's ``randlora_gamma`` (``(n, min(O, I))``) says; a weight's two sides give ``min(O, I)``
    however it is stored."""
    from .checkpoint import width_cause

    def widths(pm: PathMap) -> str | None:
        rows = []
        for p, g in gammas.items():
            e = entries.get(f"{pm(p)}.weight") if pm.applies(p) else None
            if e is not None and len(e["shape"]) == 2 and len(g) == 2:
                O, I = e["shape"]
                rows.append((pm(p), (O, I), g, (g[0], min(O, I))))
        return width_cause([r for r in rows if r[2][1] != r[3][1]], len(rows))

    return widths


def _tied_output(layers: list[str], have: set[str], entries: dict[str, dict], base: Path) -> str | None:
    """The cause when the only layers without a weight in the file are output heads (``lm_head``): a model with
    ``tie_word_embeddings=True`` stores that weight once, as the input embedding."""
    from .selection import HEAD_NAMES

    pm, _ = closest(layers, have)
    pm = pm or PathMap()
    absent = [p for p in layers if not (pm.applies(p) and pm(p) in have)]
    if not absent or any(p.rsplit(".", 1)[-1] not in HEAD_NAMES for p in absent):
        return None
    embeds = [k for k in entries if "embed" in k and k.endswith(".weight") and len(entries[k]["shape"]) == 2]
    emb = f" (here {examples(embeds, 1)})" if embeds else ""
    rest = len(layers) - len(absent)
    others = f", while its other {rest} layers are there ({pm.describe()})" if rest else ""
    return (f"{base} has no weight for the adapter's output layer {examples(absent, 2)} (looked for "
            f"{examples([f'{pm(p)}.weight' for p in absent], 2)}){others}: a model whose output layer is tied to "
            f"its input embedding (tie_word_embeddings=True) stores that weight once, as the embedding{emb}, and "
            "folding the update into it would change the input embedding too. Nothing was written. Untie it first "
            "(save the model with tie_word_embeddings=False, which writes its own lm_head.weight), then run the "
            "command again; or train the adapter without that layer")


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], AdapterConfig, dict]:
    """Read this library's adapter file or a peft adapter folder (never unpickles).

    Args:
        path: a ``.safetensors`` adapter written by :func:`randlora.save`, a checkpoint folder of
            :class:`randlora.hf.RandLoraTrainer` (its ``randlora_adapter.safetensors`` is read, through
            :func:`randlora.checkpoint.read_file`), a peft RandLora adapter folder, or the
            ``adapter_model.safetensors`` file inside such a folder.

    Returns:
        ``(tensors, settings, info)``: the tensors under this library's keys, the adapter's settings, and
        ``info["format"]`` (``"randlora"`` or ``"peft"``) and ``info["file"]`` (the file read); for peft also
        ``info["fan_in_fan_out"]`` (the folder's flag, which applies to every layer) and ``info["raw"]`` (its
        ``adapter_config.json``).

    Raises:
        CheckpointError: a folder holding neither ``adapter_config.json`` nor ``randlora_adapter.safetensors``,
            or an unreadable or corrupt adapter.
        ConfigError: a peft folder with settings this library does not support.
    """
    path = Path(path)
    if path.is_file() and path.name == PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).is_file():
        path = path.parent
    if is_peft_folder(path):
        tensors, cfg, raw = read_peft(path)
        return tensors, cfg, {"format": "peft", "fan_in_fan_out": bool(raw.get("fan_in_fan_out")), "raw": raw,
                              "file": path / PEFT_WEIGHTS}
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass an adapter .safetensors file, a checkpoint folder of "
                              "randlora.hf.RandLoraTrainer or a peft adapter folder")
    if path.is_dir() and not (path / ADAPTER_FILE).is_file():
        names = sorted(p.name for p in path.iterdir())
        model = any(n.endswith(".safetensors.index.json") or n == "model.safetensors" for n in names)
        raise CheckpointError(f"the folder {path} holds neither {PEFT_CONFIG} nor {ADAPTER_FILE} (it holds "
                              f"{len(names)} entries{': ' + examples(names) if names else ''})"
                              + (": it is a model's weights, not an adapter (a command takes those as --base)"
                                 if model else "") + "; pass an adapter .safetensors file, a checkpoint folder of "
                              "randlora.hf.RandLoraTrainer or a peft adapter folder")
    tensors, cfg = read_file(path)
    return tensors, cfg, {"format": "randlora", "file": adapter_path(path)}


def read_header(path: Path) -> tuple[int, dict]:
    """``(header length, header dict)`` of a safetensors file, read without loading any tensor.

    Raises:
        CheckpointError: the file is missing, truncated or has no valid safetensors header.
    """
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors weight file ({e})") from None
    return n, header


def tensor_entries(header: dict) -> dict[str, dict]:
    """The header's tensor entries (name -> ``dtype``, ``shape``, ``data_offsets``), without its metadata."""
    return {k: v for k, v in header.items() if k != "__metadata__"}


def layer_paths(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The adapted module paths of an adapter's tensors, sorted."""
    return sorted(k[: -len(".randlora_lambda")] for k in tensors if k.endswith(".randlora_lambda"))


def fan_in_fan_out_layers(cfg: AdapterConfig, info: dict, layers: list[str]) -> set[str]:
    """The layers whose weight is stored ``(in, out)`` (GPT-2 ``Conv1D``): listed per layer in this library's
    settings; one flag for every layer in a peft folder."""
    if info["format"] == "randlora":
        return set(cfg.fan_in_fan_out)
    return set(layers) if info["fan_in_fan_out"] else set()


def weight_key(module: str, entries: dict[str, dict]) -> str:
    """The weight file's key of the weight an adapted layer at ``module`` (a path in the file) adapts:
    ``<module>.weight``, or for an attention module's in_proj (``<attention>.in_proj``) its
    ``<attention>.in_proj_weight``."""
    key = f"{module}.weight"
    if key not in entries and module.rpartition(".")[2] == "in_proj" and f"{module}_weight" in entries:
        return f"{module}_weight"
    return module if key not in entries and module in entries else key  # (an adapted parameter: its own key)


def weight_shapes(base: Path, entries: dict[str, dict], tensors: dict[str, torch.Tensor], cfg: AdapterConfig,
                  layers: list[str], ffo: set[str], keys: dict[str, str]) -> tuple[dict[str, tuple[int, int]],
                                                                               dict[str, torch.dtype]]:
    """Each adapted layer's ``(O, I)`` and weight dtype, from the weight file's header entries.

    Args:
        base: the weight file (named in errors).
        entries: its header's tensor entries (:func:`tensor_entries`).
        tensors: the adapter's tensors (each layer's ``randlora_gamma`` must fit the weight's shape).
        cfg: the adapter's settings (``r``).
        layers: the adapter's module paths.
        ffo: the layers whose weight is stored ``(in, out)``.
        keys: each layer's weight key in the file (from :func:`map_layers`).

    Returns:
        ``(shapes, dtypes)``, both keyed by module path.

    Raises:
        CheckpointError: a layer's weight is missing, not a 2-D floating-point tensor, or of a shape the
            adapter's ``randlora_gamma`` does not fit.
    """
    missing = [keys[p] for p in layers if keys[p] not in entries]
    if missing:
        raise CheckpointError(f"{base} has no tensors for {len(missing)} of the adapter's {len(layers)} layers "
                              f"(looked for {examples(missing)}). {_CLI_PREFIX}")
    shapes, dtypes = {}, {}
    for p in layers:
        k = keys[p]
        e = entries[k]
        if len(e["shape"]) < 2 or e["dtype"] not in DTYPES:
            raise CheckpointError(f"{k} in {base} is {e['dtype']} {e['shape']}; a 2-D floating-point weight (or a "
                                  "convolution's kernel) is needed")
        d0, d1 = e["shape"][0], math.prod(e["shape"][1:])  # a kernel (O, I/groups, k…): its (O, I/groups·∏k)
        O, I = (d1, d0) if p in ffo else (d0, d1)
        gam = tensors[f"{p}.randlora_gamma"]
        lead = ()
        if gam.dim() == 3:  # a 3-D adapted parameter (E, a, b): E matrices (a, b) (randlora.experts)
            lead, (O, I) = tuple(e["shape"][:1]), e["shape"][1:] if len(e["shape"]) == 3 else (0, 0)
        n = n_bases(min(O, I), cfg.r)
        if tuple(gam.shape) != (*lead, n, min(O, I)):
            raise CheckpointError(f"{k} has shape {e['shape']} but the adapter's randlora_gamma for it is "
                                  f"{tuple(gam.shape)} (expected ({n}, {min(O, I)})); wrong base model?")
        shapes[p] = (O, I)
        dtypes[p] = DTYPES[e["dtype"]]
    return shapes, dtypes


def trained_for_weights(adapter: str | os.PathLike, fa: FileAdapter) -> dict[str, torch.Tensor]:
    """What a Trainer checkpoint folder holds beside its adapter (``randlora_trainable.safetensors``: a task
    head, modules unfrozen after ``inject``), by the weight file's keys: ``merge`` writes it into its output.

    Args:
        adapter: what :func:`read_for_weights` read (only a checkpoint folder holds such a file).
        fa: the adapter read against the weight file; its path map places the tensors (see
            :meth:`randlora.hf.Trainable.place`).

    Returns:
        Weight file key -> tensor in that key's dtype; empty when there is no such file.

    Raises:
        CheckpointError: the weight file has no tensor for some of them (the bare encoder's file, when the head
            was trained beside it) or one of another shape or not floating point: the output would not be the
            trained model, so nothing is written.
    """
    from .hf import read_trainable

    trained = read_trainable(adapter) if Path(adapter).is_dir() else None
    if trained is None:
        return {}
    inside, outside = trained.place(fa.pathmap, fa.entries)
    floats = {k: tuple(e["shape"]) for k, e in fa.entries.items() if e["dtype"] in DTYPES}
    problem = trained.misfit(inside, floats, f"the floating-point tensors of {fa.base}", outside)
    if problem:
        raise CheckpointError(
            f"{problem}; nothing was written: the merged file would not be the trained model. Merge into the "
            f"weight file of the whole model the Trainer trained (with its head), or merge the adapter alone "
            f"(--adapter {trained.file.parent / ADAPTER_FILE}) and load those parameters into the model from "
            f"{trained.file} (model.load_state_dict(safetensors.torch.load_file(path), strict=False))")
    return {inside[k]: t.to(DTYPES[fa.entries[inside[k]]["dtype"]]) for k, t in trained.tensors.items()}


def bank_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype :func:`randlora.inject` gives the bank of layers with these weight dtypes: theirs when they
    all share one, else float32."""
    kinds = set(dtypes)
    return kinds.pop() if len(kinds) == 1 else torch.float32


def adapter_bases(tensors: dict[str, torch.Tensor], cfg: AdapterConfig, info: dict,
                  shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's bases, float32: from the adapter when it holds them (checked), else regenerated (verified).

    Args:
        tensors: the adapter's tensors (``randlora_A`` / ``randlora_B`` / fingerprint when saved).
        cfg: the adapter's settings (seed, recipe, bases mode, ``r``).
        info: :func:`read_adapter`'s ``info`` (a peft folder may carry neither bases nor fingerprint).
        shapes: every adapted layer's ``(O, I)``, which size the bank.

    Returns:
        ``(A (r, m_g), B (M_g, n_g, r))``.

    Raises:
        CheckpointError: the stored bases have the wrong shapes or fail their checksum.
        FingerprintMismatch: the regenerated bases are not the ones the adapter's fingerprint names, or
            this library's adapter has neither bases nor fingerprint.
    """
    shape = bank_shape(cfg.recipe, cfg.r, shapes)
    stored = stored_bases(tensors, need_identity=info["format"] != "peft")
    if stored is not None:
        A, B = stored
        if (tuple(A.shape), tuple(B.shape)) != ((shape.r, shape.m), (shape.M, shape.n, shape.r)):
            raise CheckpointError(f"the adapter's bases have shapes A{tuple(A.shape)}, B{tuple(B.shape)} but the "
                                  f"weight file's layers need A({shape.r}, {shape.m}), B({shape.M}, {shape.n}, "
                                  f"{shape.r}); is it the adapter of another model?")
        return A, B
    A, B = generate(cfg.recipe, cfg.seed, cfg.bases, shape)
    if FP in tensors:
        diff = Fingerprint(cfg.seed, cfg.recipe, cfg.bases, shape.r, shape.M, shape.m,
                           bases_checksum(A, B)).differences(tensors[FP])
        if diff:
            raise FingerprintMismatch(f"the adapter was made with other bases than these layers give "
                                      f"({'; '.join(diff)}); is the weight file the adapter's base model?")
    return A, B
