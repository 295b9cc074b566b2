"""Selecting the layers an adapter goes on: ``targets`` / ``layers`` / ``exclude`` to module paths, validated.

What counts as a linear layer (``nn.Linear``, GPT-2 style ``Conv1D`` by duck typing), which layers
``"all-linear"`` leaves out (the output head, never a layer of the numbered blocks), which targets are refused (tied
weights, aliased modules), and which parameter names are biases.
"""

from __future__ import annotations

import difflib
import numbers
import re
from typing import Sequence

import torch
from torch import nn

from .errors import TargetError
from .layer import RandLoraLinear
from .paths import walk

__all__ = ["select", "is_linear", "is_conv1d", "is_bias_name", "HEAD_NAMES"]


def is_conv1d(mod: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: a 2-D weight stored as ``(in, out)``, recognised by class name or by a
    ``fan_in_fan_out = True`` attribute (duck typing; transformers is never imported)."""
    if isinstance(mod, RandLoraLinear):
        return False
    if type(mod).__name__ != "Conv1D" and getattr(mod, "fan_in_fan_out", None) is not True:
        return False
    return isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 2


def is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Linear, RandLoraLinear)) or is_conv1d(mod)


def _name_matcher(spec: str | Sequence[str]):
    if isinstance(spec, str):
        pat = re.compile(spec)
        return lambda name: pat.fullmatch(name) is not None
    entries = list(spec)
    return lambda name: any(name == e or name.endswith("." + e) for e in entries)


_LAYER_IDX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _layer_index(name: str) -> int | None:
    m = _LAYER_IDX.search(name)
    return int(m.group(1)) if m else None


# last name components that mark an output head in models without ``get_output_embeddings()``
HEAD_NAMES = frozenset({"lm_head", "head", "classifier", "score", "qa_outputs", "text_projection",
                        "visual_projection", "output_projection"})

_IN_BLOCK = re.compile(r"(?:^|\.)\d+\.")  # a numbered component with more of the path after it


def _in_blocks(name: str) -> bool:
    """Whether the layer at ``name`` sits inside one of the model's numbered blocks (``layers.3.mlp.down_proj``:
    an element of a ``ModuleList``/``Sequential`` holding it): a body layer, never an output head."""
    return _IN_BLOCK.search(name) is not None


def _output_heads(model: nn.Module) -> list[nn.Module]:
    """The output head(s) ``"all-linear"`` leaves out: ``get_output_embeddings()`` when the model has one; else
    the linear layers outside the numbered blocks named like a head (``HEAD_NAMES``); else none on a
    transformers base model (``model.base_model is model``: ``AutoModel``'s headless models); else the last
    linear layer when it comes after the numbered blocks, or is the last element of a model that is itself a
    stack of layers (an ``nn.Sequential`` MLP). A layer inside the blocks is never left out, and a single block
    (a bare ``nn.TransformerEncoderLayer``) has no head to tell apart."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001 - models without a head may raise
            head = None
        if isinstance(head, nn.Module):
            return [head]
    linear = [(n, m) for n, m in walk(model) if n and is_linear(m)]
    outside = [(n, m) for n, m in linear if not _in_blocks(n)]
    named = [m for n, m in outside if n.rsplit(".", 1)[-1] in HEAD_NAMES]
    if named or not linear or getattr(model, "base_model", None) is model:
        return named
    last = linear[-1][0]
    after_blocks = len(outside) < len(linear) and not _in_blocks(last)
    return [linear[-1][1]] if after_blocks or last.isdigit() else []


def _close_names(model: nn.Module, wanted: Sequence[str]) -> str:
    tails = sorted({n.rsplit(".", 1)[-1] for n, m in walk(model) if n and is_linear(m)})
    sugg = []
    for w in wanted:
        sugg += difflib.get_close_matches(w, tails, n=3)
    sugg = list(dict.fromkeys(sugg)) or tails[:8]
    return f"linear layers here are named like: {', '.join(sugg)}" if sugg else "the model has no linear layers"


def is_bias_name(name: str) -> bool:
    """Whether a parameter name is a bias (``bias`` or ``<module>.bias``): the ones ``bias=`` trains."""
    return name == "bias" or name.endswith(".bias")


def select(model: nn.Module, targets, *, layers: Sequence[int] | None = None, exclude=None) -> list[str]:
    """Names of the modules ``targets`` selects (validated: all linear, at least one).

    Raises:
        TargetError: a malformed ``targets`` / ``layers`` / ``exclude``; targets matching non-linear modules,
            nothing, or a module registered under several names.
    """
    _check_spec(targets, "targets", allow_all=True)
    named = [(n, m) for n, m in walk(model) if n]
    chosen = _by_targets(model, named, targets)
    before_exclude = chosen
    if exclude is not None:
        _check_spec(exclude, "exclude")
        chosen = [n for n in chosen if not _matcher(exclude, "exclude")(n)]
    if layers is not None:
        chosen = _by_layers(chosen, layers)
    if not chosen:
        _refuse_empty(model, targets, exclude, before_exclude)
    _refuse_aliases(model, dict(named), chosen)
    _refuse_tied(model, dict(named), chosen)
    return chosen


def _check_spec(spec, what: str, allow_all: bool = False) -> None:
    if what == "targets" and isinstance(spec, (list, tuple)) and len(spec) == 0:
        raise TargetError("targets is empty: name at least one layer, e.g. targets=['q_proj', 'v_proj']")
    if not isinstance(spec, (str, list, tuple)) or (
        not isinstance(spec, str) and not all(isinstance(t, str) for t in spec)
    ):
        kinds = "a list of names, a regex string or 'all-linear'" if allow_all else "a list of names or a regex string"
        raise TargetError(f"{what} must be {kinds}, got {spec!r}")


def _matcher(spec, what: str):
    try:
        return _name_matcher(spec)
    except re.error as e:
        raise TargetError(f"{what} {spec!r} is not a valid regular expression ({e})") from None


def _by_targets(model: nn.Module, named: list[tuple[str, nn.Module]], targets) -> list[str]:
    if targets == "all-linear":
        heads = _output_heads(model)
        return [n for n, m in named if is_linear(m) and not any(m is h for h in heads)]
    match = _matcher(targets, "targets")
    by_name = dict(named)
    chosen = [n for n, _ in named if match(n)]
    bad = [n for n in chosen if not is_linear(by_name[n])]
    if bad:
        kinds = ", ".join(f"{n} ({type(by_name[n]).__name__})" for n in bad[:5])
        raise TargetError(f"targets match modules that are not linear layers: {kinds}. "
                          "Name the nn.Linear modules inside them instead (e.g. 'q_proj').")
    return chosen


def _by_layers(chosen: list[str], layers) -> list[str]:
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple, range)) or not all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in layers
    ):
        raise TargetError(f"layers must be an int or a list of block indices (ints), got {layers!r}")
    if len(layers) == 0:
        raise TargetError("layers is empty: pass block indices such as layers=[0, 1], or layers=None for all")
    wanted = {int(i) for i in layers}
    idx = {_layer_index(n) for n in chosen} - {None}
    missing = sorted(wanted - idx)
    if missing:
        raise TargetError(f"layers {missing} do not exist among the targets (block indices present: "
                          f"{sorted(idx) or 'none'}); pass indices from that list")
    return [n for n in chosen if _layer_index(n) in wanted]


def _refuse_empty(model: nn.Module, targets, exclude, before_exclude: list[str]) -> None:
    if exclude is not None and before_exclude:
        raise TargetError(f"exclude {exclude!r} removes every layer targets {targets!r} selects "
                          f"({before_exclude[:5]}); narrow exclude")
    wanted = [targets] if isinstance(targets, str) else list(targets)
    hint = ""
    if isinstance(targets, str) and targets != "all-linear":
        hint = (f". A single string is a regular expression that must match the FULL module name "
                f"(e.g. '.*{targets}'); a list such as [{targets!r}] matches names ending with it")
    raise TargetError(f"targets {targets!r} match no layer of the model; {_close_names(model, wanted)}{hint}")


def _refuse_aliases(model: nn.Module, by_name: dict[str, nn.Module], chosen: list[str]) -> None:
    aliases: dict[int, list[str]] = {}
    for n, m in walk(model, remove_duplicate=False):
        aliases.setdefault(id(m), []).append(n)
    shared = [aliases[id(by_name[n])] for n in chosen if len(aliases[id(by_name[n])]) > 1]
    if shared:
        raise TargetError(f"target module {shared[0][0]!r} is registered under several names {shared[0]}; "
                          "an adapter would only replace one of them. Give each place its own module "
                          "(copy.deepcopy) or exclude it")


def _refuse_tied(model: nn.Module, by_name: dict[str, nn.Module], chosen: list[str]) -> None:
    """A target whose weight Parameter another module also holds (an output head tied to the input embedding)
    is refused: merging would fold ``s·ΔW`` into the one tensor both read."""
    holders: dict[int, list[str]] = {}
    for path, mod in walk(model, remove_duplicate=False):
        for k, p in mod._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append(f"{path}.{k}" if path else k)
    for n in chosen:
        others = [h for h in holders.get(id(by_name[n].weight), []) if h != f"{n}.weight"]
        if others:
            raise TargetError(
                f"target {n!r} has a tied weight: the same Parameter is also {others[0]!r}"
                f"{f' (and {len(others) - 1} more)' if len(others) > 1 else ''}, so merging would fold s·ΔW into "
                f"the tensor both read and change {others[0].rsplit('.', 1)[0]!r} too. Untie it first (e.g. "
                f"config.tie_word_embeddings=False, then layer = model.get_submodule({n!r}); layer.weight = "
                f"nn.Parameter(layer.weight.detach().clone())), or target other layers (exclude=[{n!r}])")
