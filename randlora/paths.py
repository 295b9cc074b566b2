"""Where an adapter sits in a model, and how an adapter's layer paths map onto a model's.

An adapter belongs to the module :func:`randlora.inject` was called on (its *root*: the module that holds
the basis bank). Every public call finds that root wherever it sits inside the module it is given (a wrapper
with a head, ``torch.compile``'s ``_orig_mod``, DDP's ``module``), and adapter files name layers relative to
it. Loading maps a file's layer paths onto a model's by one rule, :func:`match_paths`: the exact paths, else
the unique leading prefix that, added or stripped, maps every one of the file's paths onto the model's
(the longest common suffix wins). Anything ambiguous is refused with the candidates; ``prefix=`` overrides.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from .bank import BasisBank
from .errors import CheckpointError, StateError
from .adapter import Adapter

__all__ = ["BANK_ATTR", "PathMap", "WRAPPER_PARTS", "adapter_root", "canonical", "closest", "compiled_inner",
           "depth_difference", "examples", "linear_paths", "locate", "match_paths", "on_root", "parse_prefix",
           "roots", "walk"]

BANK_ATTR = "randlora_bank"  # the attribute of the adapter's root that holds its bank


def examples(items: Sequence[str], k: int = 3) -> str:
    """``'a', 'b', 'c' and 33 more``: a few quoted examples and a count, for error messages."""
    items = list(items)
    shown = ", ".join(repr(str(i)) for i in items[:k])
    return shown + (f" and {len(items) - k} more" if len(items) > k else "")


def walk(model: nn.Module, *, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` (same order, same names) without the modules inside adapted layers.

    An adapted layer (or adapted parameter, :mod:`randlora.experts`) is yielded, its children are not: they are
    its adapters (one set more for every adapter added), which hold no layer, bank or target any walk looks for. So a walk costs the same whether one
    adapter or thousands are loaded. ``remove_duplicate=False`` yields a module once per name it has.
    """
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, mod = stack.pop()
        if remove_duplicate:
            if id(mod) in seen:
                continue
            seen.add(id(mod))
        yield path, mod
        if isinstance(mod, Adapter):
            continue
        stack.extend((f"{path}.{k}" if path else k, c) for k, c in reversed(mod._modules.items()) if c is not None)


# ------------------------------------------------------------------------------------------------
# the adapter's root
# ------------------------------------------------------------------------------------------------
def locate(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(path, root)`` of the module holding ``model``'s adapter (``""`` when it is ``model``), or None.

    Raises:
        StateError: ``model`` holds several adapters made by separate ``inject`` calls on different submodules.
    """
    found = roots(model)
    if len(found) > 1:
        paths = [p or "<the model itself>" for p, _ in found]
        raise StateError(f"the model holds {len(found)} separate RandLora adapters, injected at {examples(paths)}: "
                         "it is ambiguous which one is meant. Pass that submodule (e.g. "
                         f"model.get_submodule({found[-1][0]!r})) instead of the whole model")
    return found[0] if found else None


def roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, root)`` of every module inside ``model`` that holds an adapter (one per ``inject`` root)."""
    if not isinstance(model, nn.Module):
        return []
    found = []
    for path, mod in walk(model):
        bank = vars(mod).get(BANK_ATTR)  # not getattr: torch.compile's wrapper forwards attributes to _orig_mod
        if isinstance(bank, BasisBank):
            found.append((path, mod))
    return found


WRAPPER_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})
"""Path components that module wrappers insert (``torch.compile``, activation checkpointing, FSDP1): an adapter
names its layers without them, so a file does not depend on which blocks were compiled or wrapped."""


def canonical(path: str) -> str:
    """``path`` without the components wrappers insert (:data:`WRAPPER_PARTS`)."""
    if not any(w in path for w in WRAPPER_PARTS):
        return path
    return ".".join(p for p in path.split(".") if p not in WRAPPER_PARTS)


def linear_paths(model: nn.Module, is_linear) -> dict[str, str]:
    """``{canonical path: real path}`` of the modules ``is_linear`` accepts (the root excluded)."""
    return {canonical(n): n for n, m in walk(model) if n and is_linear(m)}


def compiled_inner(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its ``_orig_mod``), or ``model`` itself: an adapter injected into
    a compiled model belongs to the model inside, so its paths carry no ``_orig_mod.``."""
    inner = model._modules.get("_orig_mod") if isinstance(model, nn.Module) else None
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else model


def adapter_root(model: nn.Module) -> nn.Module:
    """The module holding ``model``'s adapter; ``model`` itself when it holds none (callers then refuse)."""
    found = locate(model)
    return model if found is None else found[1]


# ------------------------------------------------------------------------------------------------
# the matching rule
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathMap:
    """Maps a file's path to a model's: strip the leading ``strip``, then put ``add`` in front."""

    strip: str = ""
    add: str = ""

    def __call__(self, path: str) -> str:
        return self.add + path[len(self.strip):] if path.startswith(self.strip) else path

    def applies(self, path: str) -> bool:
        return path.startswith(self.strip)

    @property
    def identity(self) -> bool:
        return self.strip == self.add

    def describe(self) -> str:
        if self.identity:
            return "the paths as they are"
        if not self.strip:
            return f"the prefix {self.add!r} added"
        if not self.add:
            return f"the prefix {self.strip!r} stripped"
        return f"the prefix {self.strip!r} replaced by {self.add!r}"

    def as_arg(self) -> str:
        return f"prefix=({self.strip!r}, {self.add!r})"


def parse_prefix(spec: object) -> PathMap | None:
    """The explicit override: None, ``(FROM, TO)``, ``"FROM=TO"`` or ``"TO"`` (a prefix to add).

    Raises:
        CheckpointError: ``spec`` is none of those.
    """
    if spec is None or isinstance(spec, PathMap):
        return spec
    if isinstance(spec, str):
        spec = tuple(spec.split("=", 1)) if "=" in spec else ("", spec)
    if not (isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(s, str) for s in spec)):
        raise CheckpointError(f"prefix must be (FROM, TO), 'FROM=TO' or 'TO', got {spec!r}; e.g. "
                              "prefix=('encoder.', '') strips 'encoder.' from the file's paths")
    return PathMap(*(_dotted(s) for s in spec))


def _dotted(p: str) -> str:
    return p if not p or p.endswith(".") else p + "."


def match_paths(file_paths: Iterable[str], model_paths: Iterable[str], *, prefix: object = None,
                model_desc: str = "the model's linear layers", partial: bool = False,
                widths: Callable[[PathMap], str | None] | None = None) -> PathMap:
    """The one rule mapping an adapter's layer paths onto a model's.

    Args:
        file_paths: the adapter's layer paths (module paths, as stored in its file).
        model_paths: the paths a layer may have in the model.
        prefix: an explicit override (see :func:`parse_prefix`), used as it is.
        model_desc: how the model's paths are named in an error.
        partial: when no prefix maps every path but some paths are the model's as they are, return the
            identity (the caller then reports the missing and unexpected ones itself).
        widths: for the error when no prefix maps every path: given the closest map, a sentence naming the
            layers it reaches whose widths differ from the adapter's (None when they agree). The error then
            says that first, with any depth difference (:func:`depth_difference`), and suggests no prefix.

    Returns:
        The :class:`PathMap`: identity when every path is in the model; else the unique prefix added or
        stripped that maps every path onto the model's, preferring the longest common suffix.

    Raises:
        CheckpointError: no prefix maps every path (the message names what differs first: widths, depth, or
            how far the closest prefix got), several do equally well, or ``prefix`` leaves some unmapped.
    """
    files = sorted(set(file_paths))
    have = set(model_paths)
    explicit = parse_prefix(prefix)
    if explicit is not None:
        _require_all(explicit, files, have, model_desc, f"with prefix {explicit.strip!r} -> {explicit.add!r}")
        return explicit
    if not files or all(f in have for f in files):
        return PathMap()
    best = _best(_candidates(files[0], have), files, have)
    if len(best) == 1:
        return best[0]
    if not best and partial and any(f in have for f in files):
        return PathMap()
    if len(best) > 1:
        ways = " or ".join(m.describe() for m in best[:3])
        raise CheckpointError(f"the adapter's layer paths fit the model in {len(best)} ways ({ways}); nothing was "
                              f"loaded. Choose one: {best[0].as_arg()} (--prefix {best[0].strip}={best[0].add} "
                              "on the command line), or pass the submodule the adapter was trained on")
    raise CheckpointError(_no_match(files, have, model_desc, widths))


def _candidates(f0: str, have: set[str]) -> list[PathMap]:
    """Prefixes that map ``f0`` onto a model path: stripped (shortest first), then added."""
    parts = f0.split(".")
    strips = [PathMap(strip=".".join(parts[:k]) + ".") for k in range(1, len(parts))
              if ".".join(parts[k:]) in have]
    adds = [PathMap(add=m[: -len(f0)]) for m in sorted(have) if m.endswith("." + f0)]
    return strips + adds


def _best(cands: list[PathMap], files: list[str], have: set[str]) -> list[PathMap]:
    """The candidates mapping every path, of the longest common suffix (fewest components stripped)."""
    ok = [m for m in cands if all(m.applies(f) and m(f) in have for f in files)]
    if not ok:
        return []
    depth = min(m.strip.count(".") for m in ok)
    return [m for m in ok if m.strip.count(".") == depth]


def _require_all(m: PathMap, files: list[str], have: set[str], desc: str, how: str) -> None:
    missing = [f for f in files if not (m.applies(f) and m(f) in have)]
    if missing:
        raise CheckpointError(f"{len(missing)} of the adapter's {len(files)} layers are not in {desc} {how}: "
                              f"{examples([m(f) for f in missing])}; nothing was loaded. {desc.capitalize()} "
                              f"are named like {examples(sorted(have))}")


def closest(files: Sequence[str], have: set[str]) -> tuple[PathMap | None, int]:
    """The map reaching most of an adapter's paths in a model's, for errors when none reaches them all.

    Args:
        files: the adapter's layer paths.
        have: the model's.

    Returns:
        ``(map, hits)``: the paths as they are, or the prefix added or stripped, that maps most of ``files``
        into ``have``, and how many it maps; ``(None, 0)`` when none maps one.
    """
    best, hits = None, 0
    for m in [PathMap(), *dict.fromkeys(c for f in files[:50] for c in _candidates(f, have))]:
        n = sum(m.applies(f) and m(f) in have for f in files)
        if n > hits:
            best, hits = m, n
    return best, hits


def _replacement(files: list[str], have: set[str]) -> PathMap | None:
    """The one prefix replaced by another (``FROM`` stripped, ``TO`` added) that maps every path, if exactly one
    does (fewest components stripped): the only case where suggesting ``prefix=(FROM, TO)`` helps."""
    parts = files[0].split(".")
    cands = [PathMap(".".join(parts[:k]) + ".", h[: -len(rest)]) for k in range(1, len(parts))
             for rest in [".".join(parts[k:])] for h in sorted(have) if h.endswith("." + rest)]
    best = _best(cands, files, have)
    return best[0] if len(best) == 1 else None


def _blocks(paths: Iterable[str]) -> dict[str, set[int]]:
    """Each numbered container of ``paths`` (``encoder.layer`` of ``encoder.layer.3.query``) -> its indices."""
    out: dict[str, set[int]] = {}
    for p in paths:
        parts = p.split(".")
        for i, c in enumerate(parts):
            if c.isdigit():
                out.setdefault(".".join(parts[:i]), set()).add(int(c))
    return out


def _lacking_block(path: str, blocks: dict[str, set[int]]) -> str | None:
    """The container of ``blocks`` where ``path`` has an index the container lacks (``encoder.layer`` for
    ``encoder.layer.3.query`` when the blocks are 0-1), or None."""
    parts = path.split(".")
    for i, c in enumerate(parts):
        container = ".".join(parts[:i])
        if c.isdigit() and container in blocks and int(c) not in blocks[container]:
            return container
    return None


def _ranges(ints: Iterable[int]) -> str:
    """``0-3, 6``: sorted integers as ranges."""
    out: list[str] = []
    for n in sorted(set(ints)):
        if out and n == last + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
        last = n
    return ", ".join(out)


def depth_difference(files: Iterable[str], have: Iterable[str], pm: PathMap | None = None,
                     words: tuple[str, str] = ("the adapter", "the model")) -> str | None:
    """The depth difference behind paths that do not match: an adapter for a 4-layer model on a 2-layer one.

    Args:
        files: one side's layer paths (the adapter's).
        have: the other side's (the model's).
        pm: how ``files`` map onto ``have`` (default: as they are).
        words: how the two sides are named.

    Returns:
        ``the adapter has layers 0-3 of 'encoder.layer', the model 0-1 (12 of its 24 layers are in blocks the
        model lacks)`` when every one of ``files`` that ``pm`` leaves outside ``have`` sits in a numbered block
        ``have`` lacks; None otherwise (some differ in another way, or none is missing).
    """
    pm, have = pm or PathMap(), set(have)
    ours, lacking, total = _blocks(have), {}, 0
    for f in files:
        total += 1
        if pm.applies(f) and pm(f) in have:
            continue
        container = _lacking_block(pm(f), ours) if pm.applies(f) else None
        if container is None:
            return None
        lacking[container] = lacking.get(container, 0) + 1
    if not lacking:
        return None
    theirs = _blocks(pm(f) for f in files if pm.applies(f))
    sides = "; ".join(f"layers {_ranges(theirs[c])} of {c!r}, {words[1]} {_ranges(ours[c])}"
                      for c in list(lacking)[:2])
    return (f"{words[0]} has {sides} ({sum(lacking.values())} of its {total} layers are in blocks "
            f"{words[1]} lacks)")


def _no_match(files: list[str], have: set[str], desc: str, widths=None) -> str:
    """What differs first (widths, depth), else how far the closest prefix got; examples of both sides; the fix,
    with a prefix only where one maps every path."""
    best, hits = closest(files, have)
    causes = [c for c in ((widths(best) if widths and best is not None else None),
                          depth_difference(files, have, best)) if c]
    if causes:
        return (f"{'; and '.join(causes)}. Nothing was loaded. Load it into the base model it was trained on "
                "(or a submodule of it)")
    partial = (f"with {best.describe()} only {hits} of {len(files)} match (not "
               f"{examples([f for f in files if not (best.applies(f) and best(f) in have)], 2)}); "
               if best is not None else "no leading prefix maps even one of them; ")
    tail = files[0].rsplit(".", 1)[-1]
    near = sorted(h for h in have if h.rsplit(".", 1)[-1] == tail) or sorted(have)
    kind = desc.removeprefix("the model's ")
    theirs = f"{desc} are named like {examples(near, 2)}" if near else f"the model has no {kind}"
    swap = _replacement(files, have)
    fix = f", or map the paths with {swap.as_arg()}, which maps all {len(files)}" if swap else ""
    return (f"the adapter's layers are not this model's: {partial}the adapter has {len(files)} layers such as "
            f"{examples(files, 2)}, {theirs}. Nothing was loaded. Load it into the model it was trained on (or a "
            f"submodule of it){fix}")


def on_root(fn):
    """Decorator for public calls: their first argument may be any module containing the adapter (a wrapper
    with a head, a compiled or DDP-wrapped model); the call runs on the adapter's root."""

    @functools.wraps(fn)
    def call(model, *args, **kwargs):
        return fn(adapter_root(model), *args, **kwargs)

    return call
