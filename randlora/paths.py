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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from .bank import BasisBank
from .errors import CheckpointError, StateError
from .layer import RandLoraLinear

__all__ = ["BANK_ATTR", "PathMap", "WRAPPER_PARTS", "adapter_root", "canonical", "compiled_inner", "examples",
           "linear_paths", "locate", "match_paths", "on_root", "parse_prefix", "roots", "walk"]

BANK_ATTR = "randlora_bank"  # the attribute of the adapter's root that holds its bank


def examples(items: Sequence[str], k: int = 3) -> str:
    """``'a', 'b', 'c' and 33 more``: a few quoted examples and a count, for error messages."""
    items = list(items)
    shown = ", ".join(repr(str(i)) for i in items[:k])
    return shown + (f" and {len(items) - k} more" if len(items) > k else "")


def walk(model: nn.Module, *, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` (same order, same names) without the modules inside adapted layers.

    An adapted layer is yielded, its children are not: they are its adapters (one set more for every adapter
    added), which hold no layer, bank or target any walk looks for. So a walk costs the same whether one
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
        if isinstance(mod, RandLoraLinear):
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
                model_desc: str = "the model's linear layers", partial: bool = False) -> PathMap:
    """The one rule mapping an adapter's layer paths onto a model's.

    Args:
        file_paths: the adapter's layer paths (module paths, as stored in its file).
        model_paths: the paths a layer may have in the model.
        prefix: an explicit override (see :func:`parse_prefix`), used as it is.
        model_desc: how the model's paths are named in an error.
        partial: when no prefix maps every path but some paths are the model's as they are, return the
            identity (the caller then reports the missing and unexpected ones itself).

    Returns:
        The :class:`PathMap`: identity when every path is in the model; else the unique prefix added or
        stripped that maps every path onto the model's, preferring the longest common suffix.

    Raises:
        CheckpointError: no prefix maps every path, several do equally well, or ``prefix`` leaves some unmapped.
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
    raise CheckpointError(_no_match(files, have, model_desc))


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


def _no_match(files: list[str], have: set[str], desc: str) -> str:
    """Cause first: how far the closest prefix got, then examples of both sides, then the fix."""
    tail = files[0].rsplit(".", 1)[-1]
    near = sorted(h for h in have if h.rsplit(".", 1)[-1] == tail) or sorted(have)
    best, hits = None, 0
    for m in [PathMap(), *dict.fromkeys(c for f in files[:50] for c in _candidates(f, have))]:
        n = sum(m.applies(f) and m(f) in have for f in files)
        if n > hits:
            best, hits = m, n
    partial = (f"with {best.describe()} only {hits} of {len(files)} match (not {examples([f for f in files if not (best.applies(f) and best(f) in have)], 2)}); "
               if best is not None else "no leading prefix maps even one of them; ")
    kind = desc.removeprefix("the model's ")
    theirs = f"{desc} are named like {examples(near, 2)}" if near else f"the model has no {kind}"
    return (f"the adapter's layers are not this model's: {partial}the adapter has {len(files)} layers such as "
            f"{examples(files, 2)}, {theirs}. Nothing was loaded. Load it into "
            "the model it was trained on (or a submodule of it), or map the paths with prefix=(FROM, TO)")


def on_root(fn):
    """Decorator for public calls: their first argument may be any module containing the adapter (a wrapper
    with a head, a compiled or DDP-wrapped model); the call runs on the adapter's root."""

    @functools.wraps(fn)
    def call(model, *args, **kwargs):
        return fn(adapter_root(model), *args, **kwargs)

    return call
