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

from . import attention
from .conv import RandLoraConv, is_conv, kernel_matrix_shape
from .errors import StateError, TargetError
from .adapter import Adapter
from .layer import RandLoraLinear
from .paths import canonical, walk

__all__ = ["select", "select_parameters", "held_parameters", "parameter_hint", "is_linear", "is_conv1d", "is_conv",
           "is_bias_name", "HEAD_NAMES", "is_adaptable", "kind_of", "matrix_shape", "target_module", "adapted_class",
           "adaptable_paths", "refuse_kinds"]


def is_conv1d(mod: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: a 2-D weight stored as ``(in, out)``, recognised by class name or by a
    ``fan_in_fan_out = True`` attribute (duck typing; transformers is never imported)."""
    if isinstance(mod, RandLoraLinear):
        return False
    if type(mod).__name__ != "Conv1D" and getattr(mod, "fan_in_fan_out", None) is not True:
        return False
    return isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 2


def is_linear(mod: nn.Module) -> bool:
    """An ``nn.Linear``, a GPT-2 ``Conv1D`` or an adapted one (not an adapted convolution or in_proj)."""
    if isinstance(mod, RandLoraLinear):
        return not isinstance(mod, (RandLoraConv, attention.RandLoraInProj))
    return isinstance(mod, nn.Linear) or is_conv1d(mod)


# ------------------------------------------------------------------------------------------------
# layer kinds beyond linear layers: convolutions and nn.MultiheadAttention's in_proj_weight
# ------------------------------------------------------------------------------------------------
def is_adaptable(mod) -> bool:
    """Whether a target may be ``mod``: a linear layer (:func:`is_linear`), a convolution
    (:func:`randlora.conv.is_conv`, or adapted), an attention module's in_proj (:class:`randlora.attention.InProj`,
    or adapted)."""
    return is_linear(mod) or is_conv(mod) or isinstance(mod, (RandLoraLinear, attention.InProj))


def kind_of(mod) -> str:
    """What an adaptable (or adapted) weight is, as the inject report and ``summary`` show it: its ``kind``
    attribute where it has one (``Conv2d 3x3``, ``attention in_proj``), else ``linear`` / ``Conv1D (in, out)``
    for a linear layer, else its class name."""
    kind = getattr(mod, "kind", None)
    if isinstance(kind, str):
        return kind
    if isinstance(mod, attention.InProj):
        return attention.RandLoraInProj.kind
    if isinstance(mod, RandLoraLinear) or is_linear(mod):
        return "Conv1D (in, out)" if getattr(mod, "fan_in_fan_out", False) or is_conv1d(mod) else "linear"
    return type(mod).__name__


def matrix_shape(mod) -> tuple[int, int]:
    """``(O, I)`` of the matrix a target is adapted as: an adapted layer's, a ``Conv1D``'s ``(in, out)`` weight
    read transposed, a convolution's kernel matrix (:func:`randlora.conv.kernel_matrix_shape`), else the
    weight's own shape."""
    if isinstance(mod, RandLoraLinear):
        return int(mod.out_features), int(mod.in_features)
    W = mod.weight
    if is_conv1d(mod):
        return int(W.shape[1]), int(W.shape[0])
    return kernel_matrix_shape(W) if is_conv(mod) else (int(W.shape[0]), int(W.shape[1]))


def adapted_class(mod) -> type[RandLoraLinear]:
    """The adapted layer class for a planned target (:func:`target_module`)."""
    if is_conv(mod):
        return RandLoraConv
    return attention.RandLoraInProj if isinstance(mod, attention.InProj) else RandLoraLinear


def _in_proj_views(named: list[tuple[str, nn.Module]]) -> list[tuple[str, object]]:
    """``(<attention>.in_proj, InProj)`` for each ``nn.MultiheadAttention`` whose in_proj is not adapted yet (an
    adapted one is a module of its own, listed by the walk); one with separate q/k/v weights is listed as itself."""
    return [(f"{n}.{attention.IN_PROJ}" if n else attention.IN_PROJ,
             attention.InProj(m) if m._qkv_same_embed_dim else m)
            for n, m in named if isinstance(m, nn.MultiheadAttention) and attention.IN_PROJ not in m._modules]


def _as_in_proj(chosen: list[str], by_name: dict) -> list[str]:
    """``chosen`` with each ``nn.MultiheadAttention`` replaced by its in_proj (the matrix a target naming the
    attention module adapts; its out_proj stays a target of its own), once.

    Raises:
        TargetError: the attention module has separate q/k/v weights (:func:`randlora.attention.in_proj_of`).
    """
    out = []
    for n in chosen:
        m = by_name[n]
        if isinstance(m, nn.MultiheadAttention) and f"{n}.{attention.IN_PROJ}" in by_name:
            n = f"{n}.{attention.IN_PROJ}"
            m = by_name[n]
        if isinstance(m, nn.MultiheadAttention):  # listed as itself: separate q/k/v weights
            try:
                attention.in_proj_of(m)
            except TargetError as e:
                raise TargetError(f"target {n.rpartition('.')[0] or n!r}: {e}") from None
        out.append(n)
    return list(dict.fromkeys(out))


def target_module(model: nn.Module, path: str):
    """The module at ``path``, or for ``<attention>.in_proj`` of an ``nn.MultiheadAttention`` not adapted yet, its
    :class:`randlora.attention.InProj`.

    Raises:
        AttributeError: no such module (as ``get_submodule``).
    """
    parent, _, leaf = path.rpartition(".")
    if leaf == attention.IN_PROJ:
        mha = model.get_submodule(parent)
        if isinstance(mha, nn.MultiheadAttention) and attention.IN_PROJ not in mha._modules:
            return attention.in_proj_of(mha)
    return model.get_submodule(path)


def adaptable_paths(model: nn.Module) -> dict[str, str]:
    """``{canonical path: real path}`` of every module a target may name (the root excluded), the in_proj of each
    attention module included: where a file's layer paths are looked up."""
    named = [(n, m) for n, m in walk(model) if n]
    found = [(n, m) for n, m in named + _in_proj_views([("", model)] + named) if is_adaptable(m)]
    return {canonical(n): n for n, _ in found}


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
    named += _in_proj_views([("", model)] + named)
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
    chosen = _as_in_proj([n for n, _ in named if match(n)], by_name)
    bad = [n for n in chosen if not is_adaptable(by_name[n])]
    if bad:
        kinds = ", ".join(f"{n} ({type(by_name[n]).__name__})" for n in bad[:5])
        hint = parameter_hint([by_name[n] for n in bad])  # (fused MoE experts: their tensors by name)
        raise TargetError(f"targets match modules that are not linear layers, convolutions or attention modules: "
                          f"{kinds}.{hint} Name the nn.Linear modules inside them instead (e.g. 'q_proj'); "
                          "nn.Conv1d/2d/3d and nn.MultiheadAttention (its in_proj_weight) can be named as well.")
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
    mods = {n: _owner(by_name[n]) for n in chosen}
    shared = [aliases[id(mods[n])] for n in chosen if len(aliases[id(mods[n])]) > 1]
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
        others = [h for h in holders.get(id(by_name[n].weight), []) if h not in _own_names(n, by_name[n])]
        if others:
            raise TargetError(
                f"target {n!r} has a tied weight: the same Parameter is also {others[0]!r}"
                f"{f' (and {len(others) - 1} more)' if len(others) > 1 else ''}, so merging would fold s·ΔW into "
                f"the tensor both read and change {others[0].rsplit('.', 1)[0]!r} too. Untie it first (e.g. "
                f"config.tie_word_embeddings=False, then layer = model.get_submodule({n!r}); layer.weight = "
                f"nn.Parameter(layer.weight.detach().clone())), or target other layers (exclude=[{n!r}])")


def _owner(mod) -> nn.Module:
    """The module a target lives in: itself, or for an attention module's in_proj, the attention module."""
    return mod.mha if isinstance(mod, attention.InProj) else mod


def _own_names(path: str, mod) -> set[str]:
    """The names a target's own weight has (an attention module's in_proj: ``<attention>.in_proj_weight``)."""
    if isinstance(mod, (attention.InProj, attention.RandLoraInProj)):
        return {f"{path.rpartition('.')[0]}.in_proj_weight".lstrip(".")}
    return {f"{path}.weight"}


# ------------------------------------------------------------------------------------------------
# target_parameters: weight tensors adapted by name (randlora.experts)
# ------------------------------------------------------------------------------------------------
def held_parameters(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(full name, owning module, name in it)`` of every parameter of ``model`` outside the adapters (adapted
    layers' weights included), in ``named_parameters`` order."""
    out = []
    for path, mod in walk(model):
        if isinstance(mod, Adapter):
            continue
        out += [(f"{path}.{k}" if path else k, mod, k) for k, p in mod._parameters.items() if p is not None]
    return out


def _matrix_shaped(held: list[tuple[str, nn.Module, str]]) -> list[str]:
    return [n for n, m, k in held if m._parameters[k].dim() in (2, 3)]


def select_parameters(model: nn.Module, spec, *, layers: Sequence[int] | None = None,
                      exclude=None) -> list[tuple[str, nn.Module, str]]:
    """``(full name, owning module, name in it)`` of the parameters ``target_parameters`` selects: an entry matches a
    parameter whose full name equals it or ends with ``"." + entry`` (a string: a regular expression matching the
    full name), as ``targets`` matches modules; ``layers`` / ``exclude`` apply as for ``targets``.

    Raises:
        TargetError: a malformed spec, nothing selected, a parameter not 2-D/3-D floating point (or with a
            zero-size side), a tied one (registered under several names), or a name the adapter's holder cannot take.
    """
    if isinstance(spec, (list, tuple)) and len(spec) == 0:
        raise TargetError("target_parameters is empty: name at least one weight tensor, e.g. "
                          "target_parameters=['gate_up_proj', 'down_proj']")
    _check_spec(spec, "target_parameters")
    held = held_parameters(model)
    match = _matcher(spec, "target_parameters")
    chosen = [h for h in held if match(h[0])]
    if exclude is not None:
        _check_spec(exclude, "exclude")
        drop = _matcher(exclude, "exclude")
        chosen = [h for h in chosen if not drop(h[0])]
    if layers is not None:
        kept = set(_by_layers([h[0] for h in chosen], layers))
        chosen = [h for h in chosen if h[0] in kept]
    if not chosen:
        shaped = _matrix_shaped(held)
        tails = sorted({n.rsplit(".", 1)[-1] for n in shaped})
        raise TargetError(f"target_parameters {spec!r} match no parameter of the model (after layers/exclude); its "
                          f"2-D/3-D parameters are named like {tails[:8] or 'nothing: it has none'}")
    _check_parameters(model, chosen)
    return chosen


def _check_parameters(model: nn.Module, chosen: list[tuple[str, nn.Module, str]]) -> None:
    """Each chosen tensor is 2-D/3-D floating point, held under one name, with a name its adapter can take."""
    names: dict[int, list[str]] = {}
    for path, mod in walk(model, remove_duplicate=False):
        for k, p in mod._parameters.items():
            if p is not None:
                names.setdefault(id(p), []).append(f"{path}.{k}" if path else k)
    for n, mod, k in chosen:
        W = mod._parameters[k]
        if W.dim() not in (2, 3) or 0 in W.shape or not W.is_floating_point():
            raise TargetError(f"target_parameters select {n} of shape {tuple(W.shape)} ({W.dtype}); RandLora adapts "
                              "floating-point 2-D matrices and 3-D stacks of them (E, a, b) with no zero-size side. "
                              "Narrow target_parameters (or exclude=[...])")
        if len(set(names[id(W)])) > 1:
            raise TargetError(f"target parameter {n!r} is tied: the same Parameter is also "
                              f"{[x for x in names[id(W)] if x != n][:3]}, so merging would change both. Untie it "
                              "(copy the Parameter) or leave it out")
        if hasattr(nn.ModuleDict(), k):
            raise TargetError(f"target parameter {n!r} is named like a method of nn.ModuleDict ({k!r}), which holds "
                              "the adapters of a module's parameters; rename it or leave it out")


def parameter_hint(mods: list[nn.Module]) -> str:
    """For the refusal of module targets that are no linear layers: the 2-D/3-D tensors they hold themselves, which
    ``target_parameters`` adapts (``""`` when they hold none)."""
    found = list(dict.fromkeys((f"{k} {tuple(p.shape)}", k) for m in mods for k, p in m._parameters.items()
                               if p is not None and p.dim() in (2, 3) and p.is_floating_point()))
    if not found:
        return ""
    names = list(dict.fromkeys(k for _, k in found))[:8]
    return (f" They hold weight tensors themselves ({', '.join(d for d, _ in found[:4])}"
            f"{' ...' if len(found) > 4 else ''}), such as a mixture-of-experts layer's fused experts: adapt those "
            f"with target_parameters={names!r} (inject(model, target_parameters=[...]), with or without targets).")


def refuse_kinds(layers, what: str, why: str) -> None:
    """:class:`StateError` when any of ``layers`` (``(path, adapted layer)`` pairs) is not a linear layer
    (a convolution, an attention module's in_proj) and ``what`` cannot carry it; nothing is written.

    Args:
        layers: the adapted layers ``what`` would write.
        what: the refused call, e.g. ``"randlora.save_peft"``.
        why: the reason, one clause.

    Raises:
        StateError: a layer of another kind than linear (:func:`kind_of` names it).
    """
    found = [f"{p} ({kind_of(l)})" for p, l, *_ in layers if not is_linear(l)]
    if found:
        more = f" and {len(found) - 2} more" if len(found) > 2 else ""
        raise StateError(f"{what} cannot write the adapted layers {', '.join(found[:2])}{more}: {why}. Keep this "
                         "adapter in randlora's own format (randlora.save), merge it (randlora.merge), or inject "
                         "without those layers for this export")
